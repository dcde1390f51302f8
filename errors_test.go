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
