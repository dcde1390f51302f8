package outbox

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/policy"
)

func TestHealthConfigValidate(t *testing.T) {
	if _, err := NewHealth(nil, HealthConfig{}); err == nil ||
		!strings.Contains(err.Error(), "db is nil") || !strings.Contains(err.Error(), "Dialect is required") {
		t.Fatalf("want both problems reported, got %v", err)
	}
	c := HealthConfig{Dialect: SQLite, PendingDegraded: 10, PendingUnhealthy: 5, AgeDegraded: time.Hour, AgeUnhealthy: time.Minute, PolicyFailure: "bad"}
	c.setDefaults()
	err := c.Validate()
	for _, want := range []string{"PendingUnhealthy (5) is below PendingDegraded (10)", "AgeUnhealthy (1m0s) is below AgeDegraded (1h0m0s)", `PolicyFailure "bad"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate: want %q in %v", want, err)
		}
	}
	d := HealthConfig{Dialect: SQLite}
	d.setDefaults()
	if d.Table != DefaultTable || d.PendingDegraded != 1000 || d.PendingUnhealthy != 10000 || d.MinRelays != 1 ||
		d.DeadLettersDegraded != 1 || d.DeadLettersUnhealthy != -1 || d.PolicyFailure != HealthDegraded {
		t.Fatalf("defaults: %+v", d)
	}
}

type fakePolicy struct{ err error }

func (p *fakePolicy) Healthy() error { return p.err }

func statusOf(t *testing.T, rep HealthReport, name string) HealthStatus {
	t.Helper()
	c, ok := rep.Component(name)
	if !ok {
		t.Fatalf("no component %q in %+v", name, rep)
	}
	return c.Status
}

// TestHealthTransitions walks one outbox through the states a real
// deployment goes through: no relay, a relay running (ok), a backlog, dead
// letters, a failed policy reload, the relay stopped, a relay whose
// heartbeat expires because its database connection is cut, and a relay
// that is alive but stuck.
func TestHealthTransitions(t *testing.T) {
	for name, setup := range opsDBs() {
		t.Run(name, func(t *testing.T) {
			g := setup(t)
			ctx := context.Background()
			pol := &fakePolicy{}
			var progress RelayProgress
			h, err := NewHealth(g.db, HealthConfig{
				Dialect: g.d, Table: g.table,
				PendingDegraded: 5, PendingUnhealthy: 50,
				AgeDegraded: time.Hour, AgeUnhealthy: 2 * time.Hour,
				Progress: &progress, StallAfter: 500 * time.Millisecond,
				Policy: pol,
			})
			if err != nil {
				t.Fatal(err)
			}

			// No relay has ever run.
			rep := h.Check(ctx)
			if rep.Status != HealthUnhealthy || statusOf(t, rep, "relays") != HealthUnhealthy || statusOf(t, rep, "database") != HealthOK {
				t.Fatalf("no relay: %+v", rep)
			}

			// A relay runs and drains what is staged.
			pub := &memPub{failKinds: map[string]bool{"ops.poison": true}}
			_, stop := g.startRelay(t, nil, pub, RelayConfig{Middlewares: []message.HandlerMiddleware{progress.Middleware()}})
			g.stage(t, ctx, "ops.ok", 3)
			opsEventually(t, "3 relayed", func() bool { return pub.count() == 3 })
			opsEventually(t, "healthy, acks written", func() bool {
				rep = h.Check(ctx)
				c, _ := rep.Component("pending")
				return rep.Status == HealthOK && c.Observed == 0
			})
			if progress.Relayed() != 3 {
				t.Fatalf("progress counted %d, want 3", progress.Relayed())
			}

			// A backlog over the degraded threshold (the relay is held up
			// so that the rows stay pending) is degraded, and served 200.
			release := pub.block()
			g.stage(t, ctx, "ops.ok", 7)
			rep = h.Check(ctx)
			if c, _ := rep.Component("pending"); c.Status != HealthDegraded || c.Observed != 7 {
				t.Fatalf("backlog: %+v", c)
			}
			if rep.Status != HealthDegraded {
				t.Fatalf("backlog: status %s: %+v", rep.Status, rep)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
			var body HealthReport
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || rec.Code != 200 || body.Status != HealthDegraded {
				t.Fatalf("HTTP while degraded: %d %v %s", rec.Code, err, rec.Body)
			}
			release()
			// Relayed, and the acknowledged rows deleted (batched every
			// AckInterval, later on a loaded machine).
			opsEventually(t, "10 relayed and acknowledged", func() bool {
				return pub.count() == 10 && statusOf(t, h.Check(ctx), "pending") == HealthOK
			})

			// A dead letter degrades; a failed policy reload degrades.
			g.stage(t, ctx, "ops.poison", 1)
			opsEventually(t, "dead letter", func() bool { return statusOf(t, h.Check(ctx), "dead_letters") == HealthDegraded })
			pol.err = errors.New("policy.json:3:4: syntax error")
			rep = h.Check(ctx)
			if rep.Status != HealthDegraded || statusOf(t, rep, "policy") != HealthDegraded || statusOf(t, rep, "pending") != HealthOK {
				t.Fatalf("dead letter + policy: %+v", rep)
			}
			pol.err = nil
			a, _ := NewAdmin(g.db, g.d, g.table)
			if n, err := a.Purge(ctx, DeadFilter{All: true}, nil); err != nil || n != 1 {
				t.Fatalf("purge: %d %v", n, err)
			}
			if rep = h.Check(ctx); rep.Status != HealthOK {
				t.Fatalf("after purge: %+v", rep)
			}

			// The relay is stopped: it unregisters, the check turns
			// unhealthy at once and is served 503.
			if err := stop(); err != nil {
				t.Fatalf("relay Run: %v", err)
			}
			rep = h.Check(ctx)
			if rep.Status != HealthUnhealthy || statusOf(t, rep, "relays") != HealthUnhealthy {
				t.Fatalf("relay stopped: %+v", rep)
			}
			rec = httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/healthz", nil))
			if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), `"status": "unhealthy"`) ||
				rec.Header().Get("Content-Type") != "application/json" {
				t.Fatalf("HTTP while unhealthy: %d %s", rec.Code, rec.Body)
			}

			// A relay whose database connection is cut stops renewing its
			// heartbeat, as a killed process would: within LeaseTTL the
			// check is unhealthy.
			cut := g.open(t)
			_, stop2 := g.startRelay(t, cut, pub, RelayConfig{LeaseTTL: 600 * time.Millisecond, CloseTimeout: 200 * time.Millisecond})
			opsEventually(t, "second relay live", func() bool { return statusOf(t, h.Check(ctx), "relays") == HealthOK })
			_ = cut.Close()
			opsEventually(t, "heartbeat expired", func() bool {
				rep = h.Check(ctx)
				return statusOf(t, rep, "relays") == HealthUnhealthy
			})
			if c, _ := rep.Component("relays"); !strings.Contains(c.Message, "stopped renewing its heartbeat") {
				t.Fatalf("expired relay: %+v", c)
			}
			_ = stop2()

			// A relay that is alive but stuck (its publisher hangs): the
			// heartbeat is fine, the progress counter stalls.
			release = pub.block()
			defer release()
			_, stop3 := g.startRelay(t, nil, pub, RelayConfig{Middlewares: []message.HandlerMiddleware{progress.Middleware()}, CloseTimeout: 200 * time.Millisecond})
			g.stage(t, ctx, "ops.ok", 1)
			opsEventually(t, "stuck", func() bool {
				rep = h.Check(ctx)
				return statusOf(t, rep, "relay_progress") == HealthUnhealthy
			})
			if statusOf(t, rep, "relays") != HealthOK || rep.Status != HealthUnhealthy {
				t.Fatalf("stuck relay: %+v", rep)
			}
			release()
			opsEventually(t, "unstuck", func() bool { return h.Check(ctx).Status == HealthOK })
			_ = stop3()
		})
	}
}

func TestHealthDatabaseDown(t *testing.T) {
	g := opsDBs()["sqlite"](t)
	db := g.open(t)
	h, err := NewHealth(db, HealthConfig{Dialect: g.d, Table: g.table, CacheFor: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	rep := h.Check(context.Background())
	if rep.Status != HealthUnhealthy || statusOf(t, rep, "database") != HealthUnhealthy || len(rep.Components) != 1 {
		t.Fatalf("database down: %+v", rep)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodHead, "/healthz", nil))
	if rec.Code != http.StatusServiceUnavailable || rec.Body.Len() != 0 {
		t.Fatalf("HEAD: %d %q", rec.Code, rec.Body)
	}
}

// TestHealthPolicyWatcher checks the policy component with a real
// policy.Watcher whose file is broken and then repaired.
func TestHealthPolicyWatcher(t *testing.T) {
	g := opsDBs()["sqlite"](t)
	path := filepath.Join(t.TempDir(), "policy.json")
	good := `{"Rules": [], "Default": {"Publishers": [{"Key": "bus", "Destination": "{topic}"}]}}`
	if err := os.WriteFile(path, []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	w, err := policy.NewWatcher(slog.New(slog.DiscardHandler), policy.WatcherConfig{Paths: []string{path}})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	h, err := NewHealth(g.db, HealthConfig{Dialect: g.d, Table: g.table, MinRelays: -1, Policy: w})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if rep := h.Check(ctx); rep.Status != HealthOK {
		t.Fatalf("good policy: %+v", rep)
	}
	if err := os.WriteFile(path, []byte(`{"Rules": [`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := w.Reload(); err == nil {
		t.Fatal("Reload of a broken file: want an error")
	}
	rep := h.Check(ctx)
	c, _ := rep.Component("policy")
	if rep.Status != HealthDegraded || c.Status != HealthDegraded || !strings.Contains(c.Message, "policy.json") {
		t.Fatalf("broken policy: %+v", rep)
	}
	if err := os.WriteFile(path, []byte(good+" "), 0o644); err != nil {
		t.Fatal(err)
	}
	_ = w.Reload()
	if rep := h.Check(ctx); rep.Status != HealthOK {
		t.Fatalf("repaired policy: %+v", rep)
	}
}
