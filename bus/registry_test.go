package bus_test

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/policy"
)

// The policy loader validates keys against the registry.
var _ = policy.LoadOptions{KnownPublishers: (&bus.Registry{}).HasPublisher}

// fakePublisher records Close calls.
type fakePublisher struct {
	name   string
	closed *[]string
	err    error
}

func (f fakePublisher) Publish(string, ...*message.Message) error { return nil }
func (f fakePublisher) Close() error {
	*f.closed = append(*f.closed, f.name)
	return f.err
}

func TestRegistry(t *testing.T) {
	var closed []string
	var r bus.Registry // the zero value is ready
	r.Register("rabbit", fakePublisher{"rabbit", &closed, nil})
	r.Register("local", fakePublisher{"local", &closed, errors.New("boom")})
	r.Register("nats", fakePublisher{"nats", &closed, nil})

	if got := fmt.Sprint(r.Keys()); got != "[local nats rabbit]" {
		t.Errorf("Keys = %s", got)
	}
	if !r.HasPublisher("nats") || r.HasPublisher("kafka") || r.Len() != 3 {
		t.Errorf("HasPublisher/Len wrong")
	}
	if p, ok := r.Publisher("rabbit"); !ok || p.(fakePublisher).name != "rabbit" {
		t.Errorf("Publisher(rabbit) = %v, %v", p, ok)
	}
	if _, err := r.Lookup("kafka"); !errors.Is(err, bus.ErrUnknownPublisher) {
		t.Errorf("Lookup(kafka) error = %v", err)
	}
	if err := r.RegisterSafely("rabbit", fakePublisher{"x", &closed, nil}); !errors.Is(err, bus.ErrDuplicateKey) {
		t.Errorf("duplicate: %v", err)
	}
	for _, key := range []string{"", "has space", "tab\t", "nl\n"} {
		if err := r.RegisterSafely(key, fakePublisher{"x", &closed, nil}); !errors.Is(err, bus.ErrInvalidKey) {
			t.Errorf("key %q: %v", key, err)
		}
	}
	if err := r.RegisterSafely("nilpub", nil); err == nil {
		t.Error("nil publisher accepted")
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Register of a duplicate did not panic")
			}
		}()
		r.Register("local", fakePublisher{"x", &closed, nil})
	}()

	err := r.Close()
	if err == nil || err.Error() != `bus: close publisher "local": boom` {
		t.Errorf("Close error = %v", err)
	}
	if got := fmt.Sprint(closed); got != "[nats local rabbit]" {
		t.Errorf("closed in order %s, want reverse registration", got)
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := r.RegisterSafely("late", fakePublisher{"late", &closed, nil}); !errors.Is(err, bus.ErrRegistryClosed) {
		t.Errorf("register after Close: %v", err)
	}
	if r.HasPublisher("rabbit") || len(r.Keys()) != 0 {
		t.Error("closed registry still lists publishers")
	}
}

func TestRegistryConcurrent(t *testing.T) {
	r := bus.NewRegistry()
	var closed []string
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			mu.Lock()
			p := fakePublisher{fmt.Sprint(i), &closed, nil}
			mu.Unlock()
			r.Register(fmt.Sprintf("k%d", i), p)
		}()
		go func() {
			defer wg.Done()
			_ = r.HasPublisher(fmt.Sprintf("k%d", i))
			_ = r.Keys()
		}()
	}
	wg.Wait()
	if r.Len() != 50 {
		t.Fatalf("Len = %d", r.Len())
	}
	if err := r.Close(); err != nil || len(closed) != 50 {
		t.Fatalf("Close: %v, closed %d", err, len(closed))
	}
}
