package outbox

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tailrace/tailrace/internal/testenv"
)

// TestRelayCloseBeforeRun: closing a relay that never ran returns at once
// (the router, never started, would otherwise wait out its close timeout),
// and Run on it afterwards refuses to start.
func TestRelayCloseBeforeRun(t *testing.T) {
	g := newRelayRig(t, testenv.NewSQLite(t).DB, SQLite)
	r, err := NewRelay(g.db, newRecPub(), testLogger(t), RelayConfig{Dialect: SQLite, Table: g.table})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := r.Close(); err != nil {
		t.Fatalf("Close = %v", err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("Close of a relay that never ran took %s", el)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Run(ctx); !errors.Is(err, ErrRelayClosed) {
		t.Fatalf("Run after Close = %v, want ErrRelayClosed", err)
	}
}
