package outbox

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/tailrace/tailrace/internal/testenv"
)

// deadRig stages poison messages (kind "ops.poison", refused permanently by
// the publisher) and fine ones, runs a real relay until the poison ones are
// dead-lettered (dead letters in all), and stops it.
func deadRig(t *testing.T, g *opsRig, poison, fine, dead int) {
	t.Helper()
	ctx := context.Background()
	pub := &memPub{failKinds: map[string]bool{"ops.poison": true, "ops.poison2": true}}
	_, stop := g.startRelay(t, nil, pub, RelayConfig{})
	g.stage(t, ctx, "ops.poison", poison)
	g.stage(t, ctx, "ops.ok", fine)
	dl, _ := NewDeadLetters(g.db, g.d, g.table)
	opsEventually(t, "dead letters", func() bool { n, _ := dl.Count(ctx); return n == dead })
	opsEventually(t, "fine relayed", func() bool { return pub.count() == fine })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

func TestAdmin(t *testing.T) {
	dbs := opsDBs()
	dbs["mysql"] = func(t *testing.T) *opsRig {
		m := testenv.NewMySQL(t)
		return newOpsRig(t, m.DB, MySQL, func(t *testing.T) *sql.DB { return opsOpen(t, "mysql", m.DSN) })
	}
	for name, setup := range dbs {
		t.Run(name, func(t *testing.T) {
			g := setup(t)
			ctx := context.Background()
			a, err := NewAdmin(g.db, g.d, g.table)
			if err != nil {
				t.Fatal(err)
			}
			st, err := a.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.Pending != 0 || st.DeadLetters != 0 || len(st.Relays) != 0 || st.OldestPendingAge != 0 || st.Now.IsZero() {
				t.Fatalf("empty status: %+v", st)
			}

			deadRig(t, g, 7, 3, 7)
			st, err = a.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.Pending != 0 || st.DeadLetters != 7 || st.LastDeadAt.IsZero() || st.LiveRelays() != 0 {
				t.Fatalf("after relay: %+v", st)
			}

			// Listing, filtering, paging.
			all, err := a.ListDead(ctx, DeadFilter{}, 0, 100)
			if err != nil || len(all) != 7 {
				t.Fatalf("list: %d %v", len(all), err)
			}
			for _, l := range all {
				if l.Kind != "ops.poison" || l.Attempts != 1 || l.LastError == "" || l.DeadAt.IsZero() {
					t.Fatalf("dead letter: %+v", l)
				}
			}
			page, _ := a.ListDead(ctx, DeadFilter{}, all[1].ID, 2)
			if len(page) != 2 || page[0].ID != all[2].ID {
				t.Fatalf("page: %+v", page)
			}
			if n, _ := a.CountDead(ctx, DeadFilter{Kind: "nope"}); n != 0 {
				t.Fatalf("kind filter: %d", n)
			}
			if n, _ := a.CountDead(ctx, DeadFilter{Since: time.Now().Add(time.Hour)}); n != 0 {
				t.Fatalf("since filter: %d", n)
			}
			if n, _ := a.CountDead(ctx, DeadFilter{Since: time.Now().Add(-time.Hour)}); n != 7 {
				t.Fatalf("since filter: %d", n)
			}

			// Replay and purge refuse an empty filter.
			if _, err := a.Replay(ctx, DeadFilter{}, nil); !errors.Is(err, ErrNoSelector) {
				t.Fatalf("replay without selector: %v", err)
			}
			if _, err := a.Purge(ctx, DeadFilter{}, nil); !errors.Is(err, ErrNoSelector) {
				t.Fatalf("purge without selector: %v", err)
			}

			// Replay by id, twice: moved back exactly once.
			n, err := a.Replay(ctx, DeadFilter{IDs: []int64{all[0].ID}}, nil)
			if err != nil || n != 1 {
				t.Fatalf("replay by id: %d %v", n, err)
			}
			if n, err := a.Replay(ctx, DeadFilter{IDs: []int64{all[0].ID}}, nil); err != nil || n != 0 {
				t.Fatalf("replay again: %d %v", n, err)
			}
			st, _ = a.Status(ctx)
			if st.Pending != 1 || st.DeadLetters != 6 || st.Retrying != 0 {
				t.Fatalf("after replay: %+v", st)
			}
			var mid string
			var attempts int
			if err := g.db.QueryRowContext(ctx, `SELECT message_id, attempts FROM `+g.d.quote(g.table)).Scan(&mid, &attempts); err != nil ||
				mid != all[0].MessageID || attempts != 0 {
				t.Fatalf("replayed row: %q %d %v", mid, attempts, err)
			}

			// Concurrent replays of the same letters move each once.
			var wg sync.WaitGroup
			var mu sync.Mutex
			moved := 0
			var calls [][2]int
			for range 3 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					n, err := a.Replay(ctx, DeadFilter{Kind: "ops.poison", Before: time.Now().Add(time.Hour)}, &BatchOptions{
						Size:     2,
						Progress: func(done, total int) { mu.Lock(); calls = append(calls, [2]int{done, total}); mu.Unlock() },
					})
					if err != nil && g.d != SQLite { // SQLite may report a busy snapshot: nothing moved then
						t.Errorf("concurrent replay: %v", err)
					}
					mu.Lock()
					moved += n
					mu.Unlock()
				}()
			}
			wg.Wait()
			st, _ = a.Status(ctx)
			if moved != 6 || st.Pending != 7 || st.DeadLetters != 0 {
				t.Fatalf("concurrent replay moved %d; status %+v", moved, st)
			}
			if len(calls) == 0 {
				t.Fatal("progress never called")
			}

			// Relay again (the replayed 7 and 2 new ones fail again) and
			// purge by kind and by age.
			deadRig(t, g, 2, 0, 9)
			if _, err := g.db.ExecContext(ctx, `UPDATE `+g.d.quote(g.table+suffixDead)+` SET kind = 'ops.poison2' WHERE id = (SELECT MIN(id) FROM (SELECT id FROM `+g.d.quote(g.table+suffixDead)+`) x)`); err != nil {
				t.Fatal(err)
			}
			if n, err := a.Purge(ctx, DeadFilter{Kind: "ops.poison2"}, nil); err != nil || n != 1 {
				t.Fatalf("purge by kind: %d %v", n, err)
			}
			if n, err := a.Purge(ctx, DeadFilter{Before: time.Now().Add(-time.Hour)}, nil); err != nil || n != 0 {
				t.Fatalf("purge by age, none old enough: %d %v", n, err)
			}
			if n, err := a.Purge(ctx, DeadFilter{Before: time.Now().Add(time.Hour)}, nil); err != nil || n != 8 {
				t.Fatalf("purge by age: %d %v", n, err)
			}
		})
	}
}
