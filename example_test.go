package tailrace_test

import (
	"errors"
	"fmt"
	"net"

	"github.com/tailrace/tailrace"
)

// A publisher of your own tells the outbox relay which failures are the
// transport's: marked with Unavailable, they put the relay into outage
// mode and cost the message no attempt; unmarked, they count towards
// MaxAttempts; marked with Permanent, they dead-letter at once.
func ExampleUnavailable() {
	classify := func(err error) error {
		var ne net.Error
		if errors.As(err, &ne) {
			return tailrace.Unavailable(fmt.Errorf("mybus: publish: %w", err))
		}
		return fmt.Errorf("mybus: publish: %w", err)
	}
	down := classify(&net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")})
	refused := classify(errors.New("message too large"))
	fmt.Println(tailrace.IsUnavailable(down), tailrace.IsUnavailable(refused))
	// A message that failed on one route for the transport and on another
	// for itself failed for itself.
	fmt.Println(tailrace.IsUnavailable(errors.Join(down, refused)))
	// Output:
	// true false
	// false
}
