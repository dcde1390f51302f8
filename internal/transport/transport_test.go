package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/tailrace/tailrace"
)

func TestNetwork(t *testing.T) {
	// A real refused dial: nothing listens on a port we just closed.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	_, dialErr := net.DialTimeout("tcp", addr, time.Second)
	if dialErr == nil {
		t.Skip("something listens on a just-closed port")
	}
	for _, err := range []error{
		dialErr,
		fmt.Errorf("publish: %w", dialErr),
		io.EOF,
		fmt.Errorf("read: %w", io.ErrUnexpectedEOF),
		fmt.Errorf("write: %w", syscall.ECONNRESET),
		context.DeadlineExceeded,
	} {
		if !Network(err) {
			t.Errorf("Network(%v) = false", err)
		}
		if !tailrace.IsUnavailable(Mark(err, nil)) {
			t.Errorf("Mark(%v) is not unavailable", err)
		}
	}
	for _, err := range []error{
		errors.New("message unroutable"),
		context.Canceled,
		nil,
	} {
		if Network(err) || tailrace.IsUnavailable(Mark(err, nil)) {
			t.Errorf("%v taken for a network failure", err)
		}
	}
	special := errors.New("server says: try later")
	if !tailrace.IsUnavailable(Mark(special, func(err error) bool { return err == special })) {
		t.Error("Mark ignores its classifier")
	}
}
