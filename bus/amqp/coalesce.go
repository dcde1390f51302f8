package amqp

import (
	"net"
	"sync"
)

// coalesceLimit is how many bytes may wait for the writer before Write
// blocks, so that a broker that stops reading (a memory or disk alarm)
// holds the publishers back as the socket itself would. At most twice this
// is held: one buffer being written, one filling.
const coalesceLimit = 1 << 20

// coalescingConn merges the small writes of concurrent publishes into
// fewer, larger ones.
//
// amqp091-go flushes its buffered writer after every basic.publish, so a
// publisher with hundreds of messages in flight makes one write(2) per
// message, and RabbitMQ receives and handles one small TCP segment per
// message. Here Write only appends to a buffer, and one writer goroutine
// writes whatever accumulated while its previous write ran: under load many
// publishes share a system call on both sides of the socket; when idle a
// write goes out at once, after one goroutine hand-off. Measured with
// BenchmarkPublish/tailrace/concurrent-256 (40,000 messages, three runs
// each way, 2026-12-02): the test process spent 24–25 µs of CPU per message
// against 36–37 µs without it, RabbitMQ 110–118 µs against 118–131 µs.
//
// Bytes are written in the order the Writes were called, and amqp091-go
// serializes its frame writes, so frames stay whole and in order.
//
// Write reports success once the bytes are buffered, as a write into the
// kernel's socket buffer does: a message counts as published only when the
// broker's confirm arrives, which it cannot for bytes that never left. The
// first write error is kept and returned by every later Write, which makes
// amqp091-go shut the connection down and fail the messages awaiting
// confirms (ErrConnectionLost).
type coalescingConn struct {
	net.Conn

	mu      sync.Mutex
	drained *sync.Cond // broadcast when the writer took buf or err was set
	buf     []byte     // bytes waiting for the writer
	spare   []byte     // the writer's last buffer, reused
	err     error      // sticky: the first write error, or net.ErrClosed
	kick    chan struct{}
}

func newCoalescingConn(c net.Conn) *coalescingConn {
	cc := &coalescingConn{Conn: c, kick: make(chan struct{}, 1)}
	cc.drained = sync.NewCond(&cc.mu)
	go cc.writeLoop()
	return cc
}

// Write buffers p for the writer goroutine. It blocks while more than
// coalesceLimit bytes are waiting.
func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	for c.err == nil && len(c.buf) > 0 && len(c.buf)+len(p) > coalesceLimit {
		c.drained.Wait()
	}
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	c.buf = append(c.buf, p...)
	c.mu.Unlock()
	select {
	case c.kick <- struct{}{}:
	default: // the writer is already due to look
	}
	return len(p), nil
}

// writeLoop writes what Write buffered until the connection fails or is
// closed.
func (c *coalescingConn) writeLoop() {
	for range c.kick {
		c.mu.Lock()
		out := c.buf
		c.buf, c.spare = c.spare[:0], nil
		failed := c.err != nil
		// Writes blocked for room fill the emptied buffer while this
		// write runs, however long the broker takes to read it.
		c.drained.Broadcast()
		c.mu.Unlock()
		if failed {
			return
		}
		var err error
		if len(out) > 0 {
			_, err = c.Conn.Write(out)
		}
		c.mu.Lock()
		c.spare = out[:0]
		if err != nil && c.err == nil {
			c.err = err
		}
		failed = c.err != nil
		c.drained.Broadcast()
		c.mu.Unlock()
		if failed {
			return
		}
	}
}

// Close closes the connection; bytes still buffered are dropped (nothing in
// them was confirmed). A Write blocked for room, and the writer blocked in a
// write to a broker that stopped reading, return.
func (c *coalescingConn) Close() error {
	c.mu.Lock()
	if c.err == nil {
		c.err = net.ErrClosed
	}
	c.drained.Broadcast()
	c.mu.Unlock()
	select {
	case c.kick <- struct{}{}: // the writer sees err and returns
	default:
	}
	return c.Conn.Close()
}
