package outbox

import "sync"

// Notifier is the in-process signal "new outbox messages were committed". The
// Transaction behavior calls Notify after a successful commit; a relay in the
// same process subscribes and claims at once instead of waiting for its next
// poll. Signals coalesce: a subscriber that is busy sees one pending signal,
// however many commits happened meanwhile. A signal is only a hint: relays
// also poll, so a lost signal delays a message by at most one poll interval
// and never loses it.
//
// The zero value is ready to use. A Notifier is safe for concurrent use.
type Notifier struct {
	mu   sync.Mutex
	subs map[*chan struct{}]struct{}
}

// Notify wakes every subscriber. It never blocks.
func (n *Notifier) Notify() {
	if n == nil {
		return
	}
	n.mu.Lock()
	for ch := range n.subs {
		select {
		case *ch <- struct{}{}:
		default: // a signal is already pending
		}
	}
	n.mu.Unlock()
}

// Subscribe returns a channel that receives a value after Notify, and a
// function that unsubscribes. The channel has a buffer of one, so a
// notification sent while the subscriber is busy is kept until it reads.
func (n *Notifier) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	n.mu.Lock()
	if n.subs == nil {
		n.subs = make(map[*chan struct{}]struct{})
	}
	n.subs[&ch] = struct{}{}
	n.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			n.mu.Lock()
			delete(n.subs, &ch)
			n.mu.Unlock()
		})
	}
}
