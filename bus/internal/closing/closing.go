// Package closing holds the part of a subscriber's Close that the bus
// transports share: wait for the messages already handed over to be
// settled, for at most a timeout, then give them up.
package closing

import (
	"sync"
	"time"
)

// Wait waits until wg is done or timeout has passed. When the timeout comes
// first it calls giveUp (which must make the remaining waits end: close an
// abandon channel, cancel a context) and then waits for wg after all.
func Wait(wg *sync.WaitGroup, timeout time.Duration, giveUp func()) {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		giveUp()
		<-done
	}
}
