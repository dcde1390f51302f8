package bus

import "testing"

func isReady(t *turn) bool {
	select {
	case <-t.ready():
		return true
	default:
		return false
	}
}

// The scheduler on its own: a key's turns go one after the other, keys
// and keyless turns are independent, a given-up turn gives up the ones
// behind it, and finished keys are forgotten.
func TestKeyOrder(t *testing.T) {
	o := newKeyOrder()
	a1, b1, a2, free, a3 := o.enter("a"), o.enter("b"), o.enter("a"), o.enter(""), o.enter("a")
	if !isReady(a1) || !isReady(b1) || !isReady(free) {
		t.Fatal("first turns of each key, and keyless ones, must be ready at once")
	}
	if isReady(a2) || isReady(a3) {
		t.Fatal("a key's later turns must wait")
	}
	if o.keys() != 2 {
		t.Fatalf("keys in flight %d, want 2", o.keys())
	}
	o.leave(b1, true)
	o.leave(free, true)
	if isReady(a2) {
		t.Fatal("another key's end must not free a2")
	}
	o.leave(a1, true)
	if !isReady(a2) || !a2.predecessorOK() {
		t.Fatal("a2 must be ready with its predecessor handled")
	}
	if isReady(a3) {
		t.Fatal("a3 must wait for a2")
	}
	o.leave(a2, false) // given up: nacked
	if !isReady(a3) || a3.predecessorOK() {
		t.Fatal("a3 must be ready and see its predecessor given up")
	}
	o.leave(a3, false)
	if o.keys() != 0 {
		t.Fatalf("keys in flight %d after every turn left, want 0", o.keys())
	}
	// A new turn of a key whose queue emptied starts at once.
	if a4 := o.enter("a"); !isReady(a4) || !a4.predecessorOK() {
		t.Fatal("a new turn after the key emptied must be ready")
	}
}
