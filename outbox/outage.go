package outbox

import (
	"math/rand/v2"
	"time"
)

// Outage mode of the relay, as pure decision code: given the outcome of a
// publish and the time, is the relay's output down, does the failure count
// as an attempt of the message, when may the next probe go, and when does
// sending resume. The subscriber holds one outage under its mutex and acts
// on its verdicts; nothing here touches a database, a timer or a goroutine.
//
// Two ways in:
//
//   - A transport failure (tailrace.IsUnavailable: the broker is
//     unreachable, the connection closed, a dial or confirm timed out, flow
//     control) puts the relay into outage mode at once, however few
//     messages are pending. No transport failure counts as an attempt,
//     the probes' included. Probes go at most outageProbeMax apart, so
//     sending resumes within about a second of the broker being back.
//   - Failures the publisher does not classify (a third-party publisher's
//     errors) trip the breaker only when outageThreshold different
//     messages failed in a row with no success between them; then each
//     probe's failure counts as an attempt of the probe, and probes back
//     off up to outageFallbackMax. One poison message fails alone (its key
//     holds the rest of its key back), so it never trips the breaker.
//
// The outage ends at the first success, or, in a transport outage, at the
// first probe that fails for a reason of its own (the broker answered:
// unroutable, refused): that failure counts, and the message retries as
// usual. On resume the subscriber releases the messages waiting for a
// retry delay, so that everything goes out at once rather than after its
// backoff.
type outage struct {
	down      bool
	transport bool      // entered through a transport failure
	since     time.Time // first failure of the current outage
	lastErr   string    // the latest failure of the current outage
	failures  int       // failed publishes during the current outage
	probing   bool      // a probe is in flight
	nextProbe time.Time // no probe before then
	interval  time.Duration
	failing   map[int64]struct{} // unclassified failures in a row, by message
}

const (
	// outageThreshold is how many different messages must fail in a row
	// with errors the publisher did not classify before the relay takes
	// its output to be down.
	outageThreshold = 8
	// outageProbeMin and outageProbeMax bound the wait between probes in
	// a transport outage: the first probe goes outageProbeMin after the
	// failure, the wait doubles up to outageProbeMax.
	outageProbeMin = 100 * time.Millisecond
	outageProbeMax = time.Second
	// outageFallbackMax bounds the wait between probes of an outage
	// inferred from unclassified failures, whose failures count.
	outageFallbackMax = 5 * time.Second
)

// outageVerdict is what the subscriber does after a failed publish.
type outageVerdict struct {
	// Count: the failure counts as an attempt of the message (retry
	// delay, dead letter after MaxAttempts); otherwise the message goes
	// back in line as it was.
	Count bool
	// Entered: the relay just entered outage mode.
	Entered bool
	// Resumed: the outage just ended (a probe reached the broker).
	Resumed bool
	// WakeAt, when not zero, is when the next probe may go.
	WakeAt time.Time
}

// failed records a failed publish of message id at now. transport: the
// error was marked tailrace.Unavailable; probe: the message was sent as
// the outage's probe.
func (o *outage) failed(id int64, transport, probe bool, err string, now time.Time) outageVerdict {
	if probe {
		o.probing = false
	}
	if o.down {
		o.lastErr = err
		o.failures++
		switch {
		case transport:
			// Still down; nobody's attempt.
			if probe {
				return outageVerdict{WakeAt: o.schedule(now)}
			}
			return outageVerdict{}
		case !probe:
			// Sent before the outage began: the output was down, not
			// this message.
			return outageVerdict{}
		case o.transport:
			// The broker answered the probe about the message itself:
			// the transport works again.
			o.end()
			return outageVerdict{Count: true, Resumed: true}
		default:
			// An inferred outage: the probe pays an attempt.
			return outageVerdict{Count: true, WakeAt: o.schedule(now)}
		}
	}
	if transport {
		o.enter(now, true, err)
		return outageVerdict{Entered: true, WakeAt: o.schedule(now)}
	}
	if o.failing == nil {
		o.failing = make(map[int64]struct{})
	}
	o.failing[id] = struct{}{}
	if len(o.failing) >= outageThreshold {
		o.enter(now, false, err)
		return outageVerdict{Count: true, Entered: true, WakeAt: o.schedule(now)}
	}
	return outageVerdict{Count: true}
}

// succeeded records a successful publish; it reports whether an outage
// just ended.
func (o *outage) succeeded() (resumed bool) {
	clear(o.failing)
	if !o.down {
		return false
	}
	o.end()
	return true
}

// mayEmit reports whether a message may be sent at now, and whether it is
// then the outage's probe (the caller marks it, and calls probeSent).
func (o *outage) mayEmit(now time.Time) (ok, probe bool) {
	if !o.down {
		return true, false
	}
	if o.probing || now.Before(o.nextProbe) {
		return false, false
	}
	return true, true
}

// probeSent records that the probe is in flight.
func (o *outage) probeSent() { o.probing = true }

// probeReturned records that the probe came back unsent (its partition
// went away, the relay closes).
func (o *outage) probeReturned() { o.probing = false }

func (o *outage) enter(now time.Time, transport bool, err string) {
	o.down, o.transport, o.since, o.lastErr, o.failures = true, transport, now, err, 1
	o.probing = false
	o.interval = 0
}

func (o *outage) end() {
	o.down, o.transport, o.probing = false, false, false
	o.since, o.lastErr, o.failures = time.Time{}, "", 0
	o.interval = 0
	clear(o.failing)
}

// schedule sets the time of the next probe: the wait starts at
// outageProbeMin and doubles, with ±20 % jitter, up to the mode's maximum.
func (o *outage) schedule(now time.Time) time.Time {
	maxWait := outageProbeMax
	if !o.transport {
		maxWait = outageFallbackMax
	}
	if o.interval == 0 {
		o.interval = outageProbeMin
	} else {
		o.interval = min(2*o.interval, maxWait)
	}
	d := o.interval
	if j := d / 5; j > 0 {
		d += time.Duration(rand.Int64N(int64(2*j))) - j
	}
	d = min(d, maxWait)
	o.nextProbe = now.Add(d)
	return o.nextProbe
}

// OutputStatus is the state of a relay's output (its publisher) as the
// relay sees it: whether it is in outage mode and since when. Relay.Output
// returns it; Health reports it as the "publisher" component and Metrics
// as the outage gauges.
type OutputStatus struct {
	// Down: the relay is in outage mode: publishing fails for a reason
	// that is not the messages' (tailrace.IsUnavailable), or every message
	// failed in a row. It sends one probe at a time until one gets
	// through.
	Down bool
	// Since is when the outage began (the first failure); zero when not
	// down.
	Since time.Time
	// For is how long the outage has lasted at the time of the call.
	For time.Duration
	// LastError is the latest publish failure of the outage.
	LastError string
	// Failures is how many publishes failed during the outage, probes
	// included (none of them counted as an attempt of a message when the
	// outage is a transport one).
	Failures int
	// Waiting is how many messages the relay holds, claimed and not yet
	// delivered (in flight, ready, waiting behind their key or for a
	// retry), at the time of the call.
	Waiting int
}

// status reports o at now.
func (o *outage) status(now time.Time) OutputStatus {
	if !o.down {
		return OutputStatus{}
	}
	return OutputStatus{Down: true, Since: o.since, For: now.Sub(o.since), LastError: o.lastErr, Failures: o.failures}
}
