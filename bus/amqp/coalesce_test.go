package amqp

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	return client, server
}

// Concurrent writers: every chunk arrives whole, each writer's chunks in the
// order it wrote them, and nothing is lost or added.
func TestCoalescingConnKeepsChunksWholeAndOrdered(t *testing.T) {
	client, server := tcpPair(t)
	c := newCoalescingConn(client)

	const writers, chunks = 16, 500
	var want int
	for w := range writers {
		for i := range chunks {
			want += len(chunk(w, i))
		}
	}
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(server, int64(want)))
		got <- b
	}()

	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range chunks {
				if _, err := c.Write(chunk(w, i)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()

	var b []byte
	select {
	case b = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("the reader did not get every byte")
	}
	next := make([]int, writers)
	for len(b) > 0 {
		end := bytes.IndexByte(b, '>')
		var w, i int
		if n, err := fmt.Sscanf(string(b[:max(end, 0)]), "<%d:%d:", &w, &i); end < 0 || err != nil || n != 2 {
			t.Fatalf("cannot parse a chunk at %q: %v", truncateBytes(b), err)
		}
		c := chunk(w, i)
		if !bytes.HasPrefix(b, c) {
			t.Fatalf("chunk %d of writer %d torn: %q", i, w, truncateBytes(b))
		}
		if next[w] != i {
			t.Fatalf("writer %d: chunk %d arrived, want %d", w, i, next[w])
		}
		next[w]++
		b = b[len(c):]
	}
	for w, n := range next {
		if n != chunks {
			t.Errorf("writer %d: %d chunks arrived, want %d", w, n, chunks)
		}
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if _, err := c.Write([]byte("late")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after Close: %v, want net.ErrClosed", err)
	}
}

func chunk(w, i int) []byte {
	return []byte(fmt.Sprintf("<%d:%d:%s>", w, i, bytes.Repeat([]byte{'a' + byte(w)}, 1+(i*7)%90)))
}

func truncateBytes(b []byte) []byte {
	if len(b) > 60 {
		return b[:60]
	}
	return b
}

// A peer that stops reading fills the buffer: Write blocks instead of
// growing it without bound; while the writer is stuck in a write, blocked
// Writes refill the buffer it took; and Close releases both.
func TestCoalescingConnBackpressureAndClose(t *testing.T) {
	client, server := net.Pipe() // a Write blocks until the peer reads it all
	t.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	c := newCoalescingConn(client)

	const chunkSize = 64 << 10
	var (
		mu       sync.Mutex
		accepted int // bytes Write has taken
	)
	acceptedBytes := func() int { mu.Lock(); defer mu.Unlock(); return accepted }
	blocked := make(chan error, 1)
	go func() {
		p := make([]byte, chunkSize)
		for {
			if _, err := c.Write(p); err != nil {
				blocked <- err
				return
			}
			mu.Lock()
			accepted += len(p)
			mu.Unlock()
		}
	}()
	waitFor := func(what string, want int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for acceptedBytes() < want {
			if time.Now().After(deadline) {
				c.mu.Lock()
				n := len(c.buf)
				c.mu.Unlock()
				t.Fatalf("%s: Write took %d bytes (buffer %d) after 5 s, want %d", what, acceptedBytes(), n, want)
			}
			time.Sleep(time.Millisecond)
		}
	}
	checkBlocked := func(what string, max int) {
		t.Helper()
		select {
		case err := <-blocked:
			t.Fatalf("%s: Write returned %v while the peer was not reading", what, err)
		case <-time.After(100 * time.Millisecond):
		}
		if got := acceptedBytes(); got > max {
			t.Errorf("%s: Write took %d bytes, want at most %d", what, got, max)
		}
		c.mu.Lock()
		if n := len(c.buf); n > coalesceLimit {
			t.Errorf("%s: buffer grew to %d bytes, over coalesceLimit %d", what, n, coalesceLimit)
		}
		c.mu.Unlock()
	}

	// The writer is stuck in its first write, of the chunks that had
	// accumulated when it woke; Write fills the buffer up to coalesceLimit
	// (a whole number of chunks) and then blocks.
	waitFor("peer not reading", chunkSize+coalesceLimit)
	c.mu.Lock()
	for len(c.buf) < coalesceLimit { // the last chunks are being appended
		c.mu.Unlock()
		time.Sleep(time.Millisecond)
		c.mu.Lock()
	}
	c.mu.Unlock()
	// The first write took at most one full buffer, however late the
	// writer goroutine ran.
	checkBlocked("peer not reading", 2*coalesceLimit)
	first := acceptedBytes() - coalesceLimit

	// The peer reads the write in progress only, several times over. Each
	// time the writer takes the full buffer and is stuck again; the blocked
	// Write must fill a new one meanwhile rather than wait for that write
	// to finish.
	inProgress, want := first, first+coalesceLimit
	for round := 1; round <= 10; round++ {
		if _, err := io.ReadFull(server, make([]byte, inProgress)); err != nil {
			t.Fatal(err)
		}
		inProgress, want = coalesceLimit, want+coalesceLimit
		what := fmt.Sprintf("writer stuck in write %d", round+1)
		waitFor(what, want)
		checkBlocked(what, want)
	}

	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case err := <-blocked:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("blocked Write returned %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not release a Write blocked for room")
	}
}

// Over TCP the writer gets stuck part way through a write once the kernel's
// buffers are full, at a moment the test cannot choose. Whatever that
// moment, Write must fill the buffer the writer took, up to coalesceLimit.
// (Before the fix, a Write that had gone back to sleep just before the
// writer took the buffer slept until that write finished: in about one try
// in ten here, the buffer stayed empty.)
func TestCoalescingConnFillsWhileWriterIsStuck(t *testing.T) {
	for try := 0; try < 30; try++ {
		client, _ := tcpPair(t) // the server end never reads
		c := newCoalescingConn(client)
		done := make(chan struct{})
		go func() {
			defer close(done)
			p := make([]byte, 64<<10)
			for {
				if _, err := c.Write(p); err != nil {
					return
				}
			}
		}()
		deadline := time.Now().Add(5 * time.Second)
		for {
			c.mu.Lock()
			n, err := len(c.buf), c.err
			c.mu.Unlock()
			if err != nil {
				t.Fatalf("try %d: write failed while the peer was not reading: %v", try, err)
			}
			if n == coalesceLimit {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("try %d: buffer holds %d bytes after 5 s; want Write to fill it to %d", try, n, coalesceLimit)
			}
			time.Sleep(time.Millisecond)
		}
		_ = c.Close()
		<-done
	}
}

// A failed write is reported by the next Writes, so that amqp091-go shuts
// the connection down.
func TestCoalescingConnWriteErrorIsSticky(t *testing.T) {
	client, server := tcpPair(t)
	c := newCoalescingConn(client)
	_ = server.Close()
	_ = client.(*net.TCPConn).CloseWrite() // the next write(2) fails: EPIPE

	deadline := time.Now().Add(5 * time.Second)
	var err error
	for err == nil && time.Now().Before(deadline) {
		_, err = c.Write([]byte("frame"))
		time.Sleep(time.Millisecond)
	}
	if err == nil {
		t.Fatal("Write kept succeeding on a connection that cannot be written")
	}
	if _, again := c.Write([]byte("frame")); again == nil {
		t.Error("the write error was not kept")
	}
	_ = c.Close()
}
