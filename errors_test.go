package tailrace_test

import (
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/tailrace/tailrace"
)

func TestPermanent(t *testing.T) {
	if tailrace.Permanent(nil) != nil {
		t.Fatal("Permanent(nil) must be nil")
	}
	err := tailrace.Permanent(io.ErrUnexpectedEOF)
	if !tailrace.IsPermanent(err) {
		t.Fatal("IsPermanent(Permanent(err)) = false")
	}
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatal("errors.Is does not see through Permanent")
	}
	wrapped := fmt.Errorf("publish: %w", err)
	if !tailrace.IsPermanent(wrapped) {
		t.Fatal("IsPermanent does not see a wrapped permanent error")
	}
	if tailrace.IsPermanent(io.EOF) {
		t.Fatal("IsPermanent(io.EOF) = true")
	}
	if err.Error() != io.ErrUnexpectedEOF.Error() {
		t.Fatalf("Error() = %q", err.Error())
	}
	if tailrace.Permanent(err) != err {
		t.Fatal("Permanent must not wrap twice")
	}
}

func TestUnavailable(t *testing.T) {
	if tailrace.Unavailable(nil) != nil {
		t.Fatal("Unavailable(nil) must be nil")
	}
	down := tailrace.Unavailable(io.ErrUnexpectedEOF)
	if !tailrace.IsUnavailable(down) || !tailrace.IsUnavailable(fmt.Errorf("publish: %w", down)) {
		t.Fatal("IsUnavailable does not see the marker")
	}
	if !errors.Is(down, io.ErrUnexpectedEOF) {
		t.Fatal("errors.Is does not see through Unavailable")
	}
	if down.Error() != io.ErrUnexpectedEOF.Error() {
		t.Fatalf("Error() = %q", down.Error())
	}
	if tailrace.Unavailable(down) != down {
		t.Fatal("Unavailable must not wrap twice")
	}
	if tailrace.IsUnavailable(io.EOF) || tailrace.IsUnavailable(tailrace.Permanent(io.EOF)) {
		t.Fatal("an unmarked error is unavailable")
	}
	other := tailrace.Unavailable(errors.New("connection refused"))
	if !tailrace.IsUnavailable(errors.Join(down, other)) {
		t.Fatal("a join of transport failures is a transport failure")
	}
	// One route down, another refusing the message: the message failed.
	if tailrace.IsUnavailable(errors.Join(down, errors.New("unroutable"))) {
		t.Fatal("a join with a failure of the message is unavailable")
	}
	if tailrace.IsUnavailable(errors.Join()) {
		t.Fatal("an empty join is unavailable")
	}
}
