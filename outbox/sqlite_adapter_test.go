package outbox

import (
	"context"
	"database/sql"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"
)

// TestSQLitePubSub runs Watermill's universal Pub/Sub suite on watermill-sql
// with SQLiteSchema and SQLiteOffsetsAdapter. The features claimed are those
// of watermill-sql's MySQL and PostgreSQL adapters. ForceShort keeps the
// message counts modest (100 instead of up to 10,000) so the suite runs in
// CI time; the behaviours it checks are the same.
//
// Each test of the suite gets its own database file (shared by all the
// publishers and subscribers that test creates), as each test gets its own
// schema on the server databases: the suite runs its tests in parallel, and
// in one SQLite file a subscriber of one test waiting for its consumer holds
// the write lock that the other tests' publishers need (see SQLiteSchema).
func TestSQLitePubSub(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	var mu sync.Mutex
	type dbs struct{ pub, sub *sql.DB }
	files := map[string]dbs{}
	t.Cleanup(func() {
		for _, d := range files {
			_ = d.pub.Close()
			_ = d.sub.Close()
		}
	})
	// open returns the databases of the suite test that t belongs to.
	open := func(t *testing.T) dbs {
		parts := strings.SplitN(t.Name(), "/", 4)
		key := strings.Join(parts[:min(3, len(parts))], "_")
		mu.Lock()
		defer mu.Unlock()
		if d, ok := files[key]; ok {
			return d
		}
		path := filepath.Join(dir, strings.ReplaceAll(key, "/", "_")+".db")
		dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(30000)"
		d := dbs{pub: mustOpen(t, dsn), sub: mustOpen(t, dsn+"&_txlock=immediate")}
		// Switch the new file to WAL on one connection before the suite's
		// goroutines connect at once: connections that open a fresh file
		// together race to change its journal mode, and the loser gets
		// SQLITE_BUSY from the pragma itself, without the busy timeout
		// (seen 1 in ~150 opens; once in CI as "could not initialize schema:
		// database is locked"). Once the file is in WAL mode the pragma is a
		// no-op for every later connection.
		if err := d.pub.Ping(); err != nil {
			t.Fatal(err)
		}
		files[key] = d
		return d
	}

	// A subscriber holds the write lock while it waits for its consumer;
	// AckDeadline bounds that wait, far below the busy timeout.
	ackDeadline := 2 * time.Second
	newPubSub := func(t *testing.T, group string) (message.Publisher, message.Subscriber) {
		d := open(t)
		logger := watermill.NopLogger{}
		pub, err := wsql.NewPublisher(d.pub, wsql.PublisherConfig{
			SchemaAdapter:        SQLiteSchema{},
			AutoInitializeSchema: true,
		}, logger)
		if err != nil {
			t.Fatal(err)
		}
		// The subscriber's read-then-acknowledge transactions take the
		// write lock up front (_txlock=immediate); see SQLiteSchema.
		sub, err := wsql.NewSubscriber(d.sub, wsql.SubscriberConfig{
			ConsumerGroup:    group,
			AckDeadline:      &ackDeadline,
			PollInterval:     120 * time.Millisecond,
			ResendInterval:   5 * time.Millisecond,
			RetryInterval:    10 * time.Millisecond,
			SchemaAdapter:    SQLiteSchema{},
			OffsetsAdapter:   SQLiteOffsetsAdapter{},
			InitializeSchema: true,
		}, logger)
		if err != nil {
			t.Fatal(err)
		}
		return pub, &closeWaitingSubscriber{Subscriber: sub}
	}

	features := tests.Features{
		ConsumerGroups:      true,
		ExactlyOnceDelivery: true,
		GuaranteedOrder:     true,
		Persistent:          true,
		ForceShort:          true,
	}
	t.Run("exactly_once", func(t *testing.T) {
		tests.TestPubSub(t, features,
			func(t *testing.T) (message.Publisher, message.Subscriber) { return newPubSub(t, "test") },
			newPubSub)
	})
	// The suite skips its close-while-consuming tests for exactly-once
	// Pub/Subs ("not supported yet"); run them with the claim lowered, which
	// only lets the suite tolerate duplicates.
	t.Run("close_tests", func(t *testing.T) {
		f := features
		f.ExactlyOnceDelivery = false
		t.Run("TestContinueAfterSubscribeClose", func(t *testing.T) {
			tests.TestContinueAfterSubscribeClose(t, tests.TestContext{TestID: tests.NewTestID(), Features: f},
				func(t *testing.T) (message.Publisher, message.Subscriber) { return newPubSub(t, "test") })
		})
		t.Run("TestConcurrentClose", func(t *testing.T) {
			tests.TestConcurrentClose(t, tests.TestContext{TestID: tests.NewTestID(), Features: f},
				func(t *testing.T) (message.Publisher, message.Subscriber) { return newPubSub(t, "test") })
		})
	})
}

func mustOpen(t *testing.T, dsn string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		t.Fatal(err)
	}
	return db
}

// closeWaitingSubscriber makes Close return only after every channel it
// handed out is closed. watermill-sql v3.1.0's Subscriber.Close waits for
// its consume goroutines, but they signal done (a deferred WaitGroup.Done)
// before the goroutine that started them closes the output channel, so the
// suite's check "the channel is closed once Close returned" fails now and
// then on a loaded machine. That race is upstream's and does not concern
// the SQLite adapters under test; this wrapper closes its own channels
// after the upstream ones, and Close waits for that.
type closeWaitingSubscriber struct {
	message.Subscriber
	wg        sync.WaitGroup
	once      sync.Once
	closeOnce sync.Once
	closing   chan struct{}
}

func (s *closeWaitingSubscriber) closingCh() chan struct{} {
	s.once.Do(func() { s.closing = make(chan struct{}) })
	return s.closing
}

func (s *closeWaitingSubscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	in, err := s.Subscriber.Subscribe(ctx, topic)
	if err != nil {
		return nil, err
	}
	out := make(chan *message.Message)
	closing := s.closingCh()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(out)
		for m := range in {
			select {
			case out <- m:
			case <-closing: // nobody reads any more: hand it back
				m.Nack()
			}
		}
	}()
	return out, nil
}

// SubscribeInitialize keeps the wrapped subscriber's initializer visible to
// the suite (an embedded interface promotes only its own methods).
func (s *closeWaitingSubscriber) SubscribeInitialize(topic string) error {
	if si, ok := s.Subscriber.(message.SubscribeInitializer); ok {
		return si.SubscribeInitialize(topic)
	}
	return nil
}

func (s *closeWaitingSubscriber) Close() error {
	ch := s.closingCh()
	s.closeOnce.Do(func() { close(ch) })
	err := s.Subscriber.Close()
	s.wg.Wait()
	return err
}
