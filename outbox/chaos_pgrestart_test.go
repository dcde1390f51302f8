package outbox_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
)

// TestChaosPostgresRestart restarts the local PostgreSQL server while a
// relay drains a backlog and senders keep committing. It runs only with
// TAILRACE_CHAOS=1 (make chaos), because it breaks every other user of the
// server meanwhile, and needs the Debian cluster tools:
//
//	pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main restart
//
// Ledger: every message whose commit returned nil must be delivered; a
// message whose COMMIT failed is "ambiguous" (PostgreSQL may or may not
// have committed it) and may or may not be delivered; nothing else may be.
func TestChaosPostgresRestart(t *testing.T) {
	if os.Getenv("TAILRACE_CHAOS") != "1" {
		t.Skip("restarts the shared PostgreSQL server; set TAILRACE_CHAOS=1 to run")
	}
	versions, err := os.ReadDir("/etc/postgresql")
	if err != nil || len(versions) != 1 {
		t.Skipf("no single local PostgreSQL cluster under /etc/postgresql (%v)", err)
	}
	if _, err := exec.LookPath("pg_ctlcluster"); err != nil {
		t.Skip("pg_ctlcluster not found")
	}
	n := 5000
	pg := testenv.NewPostgres(t)
	url := testenv.AMQPURL(t)
	q := newChaosQueue(t, url)
	ob, table := chaosOutbox(t, pg.DB, 0)
	ctx := context.Background()

	var mu sync.Mutex
	want, ambiguous := map[string]bool{}, map[string]bool{}
	stageTx := func(ids []string) {
		tx, err := pg.DB.BeginTx(ctx, nil)
		if err != nil {
			return // nothing staged
		}
		var vals []any
		for _, id := range ids {
			vals = append(vals, chaosStage(id, q.name, ""))
		}
		if err := ob.StageTx(ctx, tx, vals...); err != nil {
			_ = tx.Rollback()
			return
		}
		err = tx.Commit()
		mu.Lock()
		defer mu.Unlock()
		for _, id := range ids {
			if err == nil {
				want[id] = true
			} else {
				ambiguous[id] = true
			}
		}
	}
	for start := 0; start < n; start += 500 {
		var ids []string
		for i := start; i < start+500; i++ {
			ids = append(ids, fmt.Sprintf("m-%06d", i))
		}
		stageTx(ids)
	}
	if len(want) != n {
		t.Fatalf("staged %d of %d before the restart", len(want), n)
	}
	startChaosRelay(t, pg.DB, chaosPublisher(t, url), outbox.RelayConfig{Table: table})

	// Senders keep committing 10 messages per transaction every 20 ms.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			var ids []string
			for j := range 10 {
				ids = append(ids, fmt.Sprintf("s-%05d-%d", i, j))
			}
			stageTx(ids)
		}
	}()
	time.Sleep(300 * time.Millisecond) // mid-drain
	before := q.distinct()
	rctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	restart := exec.CommandContext(rctx, "pg_ctlcluster", "--skip-systemctl-redirect", versions[0].Name(), "main", "restart")
	began := time.Now()
	out, err := restart.CombinedOutput()
	if err != nil {
		close(stop)
		wg.Wait()
		t.Fatalf("restart: %v: %s", err, out)
	}
	took := time.Since(began)
	time.Sleep(3 * time.Second) // senders commit after the restart too
	close(stop)
	wg.Wait()

	mu.Lock()
	wantN := len(want)
	mu.Unlock()
	deadline := time.Now().Add(2 * time.Minute)
	for q.distinct() < wantN && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	q.mu.Lock()
	lost, dup, unexpected, ambDelivered := 0, 0, 0, 0
	for id, k := range q.got {
		dup += k - 1
		switch {
		case want[id]:
		case ambiguous[id]:
			ambDelivered++
		default:
			unexpected++
		}
	}
	for id := range want {
		if q.got[id] == 0 {
			lost++
		}
	}
	q.mu.Unlock()
	left := countRows(t, pg.DB, table)
	t.Logf("CHAOS LEDGER PostgreSQL restart under load (restart took %s, %d delivered before it): committed %d, ambiguous commits %d (delivered %d), delivered %d, lost %d, duplicated %d, unexpected %d, stuck %d",
		took.Round(time.Millisecond), before, wantN, len(ambiguous), ambDelivered, q.distinct(), lost, dup, unexpected, left)
	if lost != 0 || unexpected != 0 || left != 0 {
		t.Fatal("ledger mismatch")
	}
}
