package bus

import "sync"

// keyOrder keeps the messages of one partition key in the order they were
// delivered while messages of different keys go their own way. It is the
// Consumer's scheduler, pure code without I/O:
//
//   - enter is called once per message, in delivery order (by the one
//     goroutine that reads a subscription), and returns the message's turn;
//   - the message's handler waits for turn.ready before it starts;
//   - leave ends the turn once the message is settled (handled and about to
//     be acked, or given up and about to be nacked) and lets the next
//     message of the key go.
//
// A message without a key ("") has no predecessor and is never one.
//
// If a message is given up (not handled: it will be nacked and redelivered),
// the messages of its key that were delivered after it must not run before
// its redelivery: leave(t, false) marks the turn failed, and the turns
// behind it see that and give up too (wait returns false), in order, so a
// broker that requeues in place (RabbitMQ) redelivers the key in its
// original order.
type keyOrder struct {
	mu    sync.Mutex
	tails map[string]*turn // the last turn entered per key, until it leaves
}

// turn is one message's place in its key's queue.
type turn struct {
	key  string
	prev *turn         // the turn before it, nil once passed
	done chan struct{} // closed by leave
	ok   bool          // written before done is closed: the message was handled
}

func newKeyOrder() *keyOrder { return &keyOrder{tails: map[string]*turn{}} }

// enter appends a message of key to its key's queue.
func (o *keyOrder) enter(key string) *turn {
	t := &turn{key: key, done: make(chan struct{})}
	if key == "" {
		return t
	}
	o.mu.Lock()
	t.prev = o.tails[key]
	o.tails[key] = t
	o.mu.Unlock()
	return t
}

// ready returns a channel closed when t may run: its predecessor has left.
// Call predecessorOK once it is closed.
func (t *turn) ready() <-chan struct{} {
	if t.prev == nil {
		return closedChan
	}
	return t.prev.done
}

// predecessorOK reports, once ready is closed, whether the message before t
// was handled (true) or given up (false, and t must be given up too). It
// drops the link to the predecessor so finished turns are not retained.
func (t *turn) predecessorOK() bool {
	if t.prev == nil {
		return true
	}
	ok := t.prev.ok
	t.prev = nil
	return ok
}

// leave ends t: handled reports whether the message was handled (acked) or
// given up (nacked). Each turn leaves exactly once.
func (o *keyOrder) leave(t *turn, handled bool) {
	t.ok = handled
	if t.key != "" {
		o.mu.Lock()
		if o.tails[t.key] == t {
			delete(o.tails, t.key)
		}
		o.mu.Unlock()
	}
	close(t.done)
}

// keys returns how many keys have a message in flight.
func (o *keyOrder) keys() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.tails)
}

var closedChan = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()
