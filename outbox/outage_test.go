package outbox

import (
	"testing"
	"time"
)

// The outage decisions, without a database: the clock is an argument.

func TestOutageTransportFailureEntersAtOnce(t *testing.T) {
	var o outage
	t0 := time.Unix(1000, 0)
	v := o.failed(1, true, false, "bus/amqp: not connected", t0)
	if v.Count || !v.Entered || v.WakeAt.IsZero() {
		t.Fatalf("first transport failure: %+v; want entered, not counted, a probe scheduled", v)
	}
	if ok, _ := o.mayEmit(t0); ok {
		t.Fatal("emitting right after the outage began")
	}
	// The other message in flight fails too: not its fault either.
	if v := o.failed(2, true, false, "not connected", t0.Add(time.Millisecond)); v.Count || v.Entered {
		t.Fatalf("second transport failure: %+v", v)
	}
	st := o.status(t0.Add(12 * time.Second))
	if !st.Down || st.For != 12*time.Second || st.Failures != 2 || st.LastError != "not connected" {
		t.Fatalf("status: %+v", st)
	}
}

func TestOutageProbesAtMostASecondApartAndNeverCount(t *testing.T) {
	var o outage
	now := time.Unix(1000, 0)
	v := o.failed(1, true, false, "down", now)
	failedAt := now
	for i := 0; i < 200; i++ { // 200 failed probes: far more than any MaxAttempts
		if ok, _ := o.mayEmit(v.WakeAt.Add(-time.Millisecond)); ok {
			t.Fatalf("probe %d allowed before its time", i)
		}
		if wait := v.WakeAt.Sub(failedAt); wait > outageProbeMax || wait <= 0 {
			t.Fatalf("probe %d waits %s; want (0, %s]", i, wait, outageProbeMax)
		}
		now = v.WakeAt
		ok, probe := o.mayEmit(now)
		if !ok || !probe {
			t.Fatalf("probe %d not allowed at its time: ok=%v probe=%v", i, ok, probe)
		}
		o.probeSent()
		if ok, _ := o.mayEmit(now); ok {
			t.Fatal("a second message while the probe is in flight")
		}
		failedAt = now.Add(time.Millisecond)
		v = o.failed(int64(i%2+1), true, true, "down", failedAt)
		if v.Count || v.Resumed {
			t.Fatalf("failed probe %d: %+v", i, v)
		}
	}
	if !o.status(now).Down {
		t.Fatal("not down after failed probes")
	}
	if !o.succeeded() {
		t.Fatal("a success did not end the outage")
	}
	if ok, probe := o.mayEmit(now); !ok || probe {
		t.Fatalf("after the outage: ok=%v probe=%v", ok, probe)
	}
	if o.status(now).Down {
		t.Fatal("still down after a success")
	}
}

func TestOutageProbeRefusedForItselfResumes(t *testing.T) {
	var o outage
	now := time.Unix(1000, 0)
	v := o.failed(1, true, false, "down", now)
	_, _ = o.mayEmit(v.WakeAt)
	o.probeSent()
	// The broker is back and returns the probe as unroutable.
	v = o.failed(1, false, true, "unroutable", v.WakeAt)
	if !v.Count || !v.Resumed {
		t.Fatalf("a probe refused for itself: %+v; want counted and resumed", v)
	}
	if o.status(now).Down {
		t.Fatal("still down")
	}
}

func TestOutageUnclassifiedFailuresNeedManyMessages(t *testing.T) {
	var o outage
	now := time.Unix(1000, 0)
	// One poison message failing again and again: never an outage.
	for i := 0; i < 50; i++ {
		if v := o.failed(7, false, false, "unroutable", now); !v.Count || v.Entered {
			t.Fatalf("poison failure %d: %+v", i, v)
		}
	}
	// A success clears the run.
	o.succeeded()
	for id := int64(1); id < outageThreshold; id++ {
		if v := o.failed(id, false, false, "boom", now); v.Entered {
			t.Fatalf("entered after %d messages", id)
		}
	}
	v := o.failed(outageThreshold, false, false, "boom", now)
	if !v.Entered || !v.Count {
		t.Fatalf("threshold reached: %+v", v)
	}
	// In an inferred outage the probe's unclassified failure counts and
	// the probes back off further.
	_, _ = o.mayEmit(v.WakeAt)
	o.probeSent()
	var longest time.Duration
	for i := 0; i < 10; i++ {
		at := v.WakeAt
		v = o.failed(1, false, true, "boom", at)
		if !v.Count || v.Resumed {
			t.Fatalf("inferred outage probe: %+v", v)
		}
		longest = max(longest, v.WakeAt.Sub(at))
		o.probeSent()
	}
	if longest <= outageProbeMax || longest > outageFallbackMax {
		t.Fatalf("longest wait between probes of an inferred outage %s; want (%s, %s]", longest, outageProbeMax, outageFallbackMax)
	}
	// Late failures of messages sent before the outage do not count.
	if v := o.failed(99, false, false, "boom", now); v.Count {
		t.Fatalf("late failure during an outage counted: %+v", v)
	}
	// A transport failure of a probe in an inferred outage counts for
	// nobody.
	if v := o.failed(1, true, true, "down", now); v.Count {
		t.Fatalf("transport failure of a probe counted: %+v", v)
	}
}
