package outbox

import (
	"sync"
	"testing"
	"time"
)

func TestNotifierCoalescesAndFansOut(t *testing.T) {
	var n Notifier
	a, cancelA := n.Subscribe()
	b, cancelB := n.Subscribe()
	defer cancelB()
	for i := 0; i < 10; i++ {
		n.Notify()
	}
	for name, ch := range map[string]<-chan struct{}{"a": a, "b": b} {
		select {
		case <-ch:
		case <-time.After(time.Second):
			t.Fatalf("%s: no signal", name)
		}
		select {
		case <-ch:
			t.Fatalf("%s: signals did not coalesce", name)
		default:
		}
	}
	cancelA()
	cancelA() // idempotent
	n.Notify()
	select {
	case <-a:
		t.Fatal("unsubscribed channel still signalled")
	default:
	}
	<-b
}

func TestNotifierConcurrent(t *testing.T) {
	var n Notifier
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			for j := 0; j < 1000; j++ {
				n.Notify()
			}
		}()
		go func() {
			defer wg.Done()
			for j := 0; j < 100; j++ {
				ch, cancel := n.Subscribe()
				n.Notify()
				<-ch
				cancel()
			}
		}()
	}
	wg.Wait()
	var nilN *Notifier
	nilN.Notify() // a nil Notifier is a no-op
}
