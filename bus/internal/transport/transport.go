// Package transport tells network failures from the others, for the
// publishers of the bus: what they mark with tailrace.Unavailable.
package transport

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"

	"github.com/tailrace/tailrace"
)

// Network reports whether err is a failure of the network path to a
// server: a dial that failed or timed out, a connection refused, reset or
// cut short, an I/O timeout.
func Network(err error) bool {
	if err == nil {
		return false
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	for _, target := range []error{io.EOF, io.ErrUnexpectedEOF, net.ErrClosed, context.DeadlineExceeded,
		syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED, syscall.EPIPE,
		syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.ETIMEDOUT} {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

// Mark returns err marked with tailrace.Unavailable when down(err) or
// Network(err) says it is a transport failure, and err unchanged
// otherwise.
func Mark(err error, down func(error) bool) error {
	if err == nil || tailrace.IsUnavailable(err) {
		return err
	}
	if Network(err) || (down != nil && down(err)) {
		return tailrace.Unavailable(err)
	}
	return err
}
