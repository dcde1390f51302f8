package outbox

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tailrace/tailrace/internal/testenv"
)

func TestNotifyPostgres(t *testing.T) {
	pg := testenv.NewPostgres(t)
	table := testenv.UniqueName("nb") // channels are database-wide: one of our own
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	listener, err := pgx.Connect(ctx, pg.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close(context.Background())
	if _, err := listener.Exec(ctx, `LISTEN `+table); err != nil {
		t.Fatal(err)
	}

	n := &Notifier{}
	stop, err := NotifyPostgres(pg.DB, table, n, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	for i := 0; i < 3; i++ {
		n.Notify()
		wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
		got, err := listener.WaitForNotification(wctx)
		wcancel()
		if err != nil {
			t.Fatalf("signal %d: no notification: %v", i, err)
		}
		if got.Channel != table {
			t.Fatalf("channel %q, want %q", got.Channel, table)
		}
		// Drain notifications of coalesced signals, if any.
		for {
			dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
			_, err := listener.WaitForNotification(dctx)
			dcancel()
			if err != nil {
				break
			}
		}
	}

	if _, err := NotifyPostgres(nil, "Bad-Name", nil, nil); err == nil {
		t.Fatal("bad arguments accepted")
	}
}
