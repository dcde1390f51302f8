package main

import (
	"bytes"
	"context"
	"database/sql"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// syncBuffer is a log sink written by the handlers' goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestHTTPErrors checks the API's answers to bodies and orders it cannot
// take — 413 for a body over 1 MiB and for an order whose event exceeds the
// outbox payload cap, 400 for anything but exactly one JSON object — and
// that the expected 4xx outcomes (conflict, not found) are not logged at
// ERROR.
func TestHTTPErrors(t *testing.T) {
	svc := newServices(t)
	db, err := sql.Open("pgx", svc.pg.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	cfg := Config{
		Addr: "127.0.0.1:0", PostgresURL: svc.pg.URL, AMQPURL: svc.amqpURL, AMQPPrefix: svc.prefix,
		NATSURL: svc.natsURL, NATSPrefix: svc.prefix, PolicyPaths: []string{"policy.json"}, Roles: []string{RoleAPI},
	}
	cfg.setDefaults()
	logs := &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx := context.Background()
	if err := initSchema(ctx, db); err != nil {
		t.Fatal(err)
	}
	app, cleanup, err := initApp(cfg, logger, db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cleanup)
	srv := httptest.NewServer(app.Handler())
	defer srv.Close()
	url := srv.URL + "/orders"

	var eb errorBody
	big := `{"customer":"` + strings.Repeat("a", 2<<20) + `","amount_cents":1}`
	if code := call(t, "POST", url, big, nil, &eb); code != http.StatusRequestEntityTooLarge || !strings.Contains(eb.Error, "larger than 1048576 bytes") {
		t.Errorf("2 MiB body: %d %+v", code, eb)
	}
	// Under the body cap, over the outbox's 256 KiB payload cap.
	large := `{"customer":"` + strings.Repeat("a", 300<<10) + `","amount_cents":1}`
	if code := call(t, "POST", url, large, nil, &eb); code != http.StatusRequestEntityTooLarge || !strings.Contains(eb.Error, "payload limit") {
		t.Errorf("order over the payload cap: %d %+v", code, eb)
	}
	for _, body := range []string{
		`{"customer":"ada","amount_cents":1}{"customer":"bob","amount_cents":2}`,
		`{"customer":"ada","amount_cents":1} {}`,
		`{"customer":"ada","amount_cents":1} x`,
		`{"customer":"ada","amount_cents":1}]`,
	} {
		if code := call(t, "POST", url, body, nil, &eb); code != http.StatusBadRequest {
			t.Errorf("%s: %d %+v; want 400", body, code, eb)
		}
	}
	var created map[string]OrderID
	if code := call(t, "POST", url, "\n {\"customer\":\"ada\",\"amount_cents\":1}\n\n", nil, &created); code != http.StatusCreated {
		t.Fatalf("one object with white space around: %d", code)
	}
	id := string(created["id"])
	if code := call(t, "POST", srv.URL+"/orders/"+id+"/cancel", "", nil, nil); code != http.StatusNoContent {
		t.Fatalf("cancel: %d", code)
	}
	if code := call(t, "POST", srv.URL+"/orders/"+id+"/cancel", "", nil, &eb); code != http.StatusConflict {
		t.Fatalf("second cancel: %d", code)
	}
	if code := call(t, "GET", srv.URL+"/orders/nope", "", nil, &eb); code != http.StatusNotFound {
		t.Fatalf("unknown order: %d", code)
	}
	out := logs.String()
	if strings.Contains(out, "level=ERROR") {
		t.Errorf("an expected outcome was logged at ERROR:\n%s", out)
	}
	for _, want := range []string{"level=INFO msg=\"mediator dispatch\" kind=orders.cancel", "already cancelled", "level=WARN msg=\"mediator dispatch\" kind=orders.create"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}
