package tailrace

import "errors"

// permanentError marks an error that retrying cannot fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// Permanent marks err as permanent: retrying components (the Retry behavior,
// the outbox relay, consumers) give up on it at once instead of retrying, and
// dead-letter the message where there is one. Permanent(nil) returns nil.
// errors.Is and errors.As see through the marker.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	if IsPermanent(err) {
		return err
	}
	return &permanentError{err: err}
}

// IsPermanent reports whether err, or any error it wraps, was marked with
// Permanent.
func IsPermanent(err error) bool {
	var p *permanentError
	return errors.As(err, &p)
}

// unavailableError marks a failure of the transport, not of the message.
type unavailableError struct{ err error }

func (e *unavailableError) Error() string { return e.err.Error() }
func (e *unavailableError) Unwrap() error { return e.err }

// Unavailable marks err as a failure of the transport rather than of the
// message being sent: the broker or database is unreachable, the
// connection or channel closed, a dial or a confirm timed out, the server
// applies flow control. Publishers in bus/... mark their errors this way.
//
// The outbox relay does not count such a failure as an attempt of the
// message: the first one puts the relay into outage mode (it stops sending
// and probes until the transport works again), so an outage never
// dead-letters a message. Failures about the message itself (unroutable,
// refused by the broker, too large, unencodable) stay unmarked and count
// towards the relay's MaxAttempts. Unavailable(nil) returns nil; errors.Is
// and errors.As see through the marker.
func Unavailable(err error) error {
	if err == nil {
		return nil
	}
	var u *unavailableError
	if errors.As(err, &u) {
		return err
	}
	return &unavailableError{err: err}
}

// IsUnavailable reports whether err is a failure of the transport: it, or
// an error it wraps, was marked with Unavailable. An error that joins
// several failures (Unwrap() []error, as errors.Join and a routing
// publisher's per-route errors do) is unavailable only when every one of
// them is: a message that also failed for a reason of its own is the
// message's failure.
func IsUnavailable(err error) bool {
	for err != nil {
		switch e := err.(type) {
		case *unavailableError:
			return true
		case interface{ Unwrap() []error }:
			errs := e.Unwrap()
			n := 0
			for _, x := range errs {
				if x == nil {
					continue
				}
				if !IsUnavailable(x) {
					return false
				}
				n++
			}
			return n > 0
		case interface{ Unwrap() error }:
			err = e.Unwrap()
		default:
			return false
		}
	}
	return false
}
