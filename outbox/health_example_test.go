package outbox_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/tailrace/tailrace/outbox"
)

// opsExampleDB opens a fresh SQLite file with the outbox table.
func opsExampleDB() (*sql.DB, func()) {
	dir, err := os.MkdirTemp("", "tailrace-ops-example")
	if err != nil {
		panic(err)
	}
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "app.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_txlock=immediate")
	if err != nil {
		panic(err)
	}
	if err := outbox.InitializeSchema(context.Background(), db, outbox.SQLite, outbox.DefaultTable); err != nil {
		panic(err)
	}
	return db, func() { _ = db.Close(); _ = os.RemoveAll(dir) }
}

// Serve the outbox health check over HTTP next to a relay: 200 while the
// relay runs, 503 once it stopped.
func ExampleHealth() {
	db, cleanup := opsExampleDB()
	defer cleanup()

	// The relay, with the progress counter the check watches for stalls.
	var progress outbox.RelayProgress
	broker := gochannel.NewGoChannel(gochannel.Config{}, watermill.NopLogger{})
	relay, err := outbox.NewRelay(db, broker, slog.New(slog.DiscardHandler), outbox.RelayConfig{
		Dialect: outbox.SQLite, Table: outbox.DefaultTable,
		Middlewares: []message.HandlerMiddleware{progress.Middleware()},
	})
	if err != nil {
		panic(err)
	}
	go func() { _ = relay.Run(context.Background()) }()

	health, err := outbox.NewHealth(db, outbox.HealthConfig{
		Dialect:  outbox.SQLite,
		Progress: &progress,
		// Policy: watcher, // a *policy.Watcher: a failed reload degrades
	})
	if err != nil {
		panic(err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /healthz/outbox", health)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	get := func() {
		resp, err := http.Get(srv.URL + "/healthz/outbox")
		if err != nil {
			panic(err)
		}
		defer resp.Body.Close()
		var rep outbox.HealthReport
		if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
			panic(err)
		}
		fmt.Println(resp.StatusCode, rep.Status)
		for _, c := range rep.Components {
			fmt.Printf("  %s: %s\n", c.Name, c.Status)
		}
	}
	// Wait for the relay's first heartbeat.
	for deadline := time.Now().Add(10 * time.Second); health.Check(context.Background()).Status != outbox.HealthOK && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	get()
	_ = relay.Close()
	get()
	// Output:
	// 200 ok
	//   database: ok
	//   pending: ok
	//   oldest_pending: ok
	//   dead_letters: ok
	//   relays: ok
	//   relay_progress: ok
	// 503 unhealthy
	//   database: ok
	//   pending: ok
	//   oldest_pending: ok
	//   dead_letters: ok
	//   relays: unhealthy
	//   relay_progress: ok
}

// Export the outbox gauges: they are read from the database when the
// metrics are collected. A ManualReader stands in for an exporter here.
func ExampleMetrics_ObserveTable() {
	db, cleanup := opsExampleDB()
	defer cleanup()
	ctx := context.Background()

	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer mp.Shutdown(ctx)
	metrics, err := outbox.NewMetrics(mp)
	if err != nil {
		panic(err)
	}
	reg, err := metrics.ObserveTable(db, outbox.SQLite, outbox.DefaultTable)
	if err != nil {
		panic(err)
	}
	defer reg.Unregister()

	ob, _ := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite})
	tx, _ := db.BeginTx(ctx, nil)
	_ = ob.StageTx(ctx, tx,
		outbox.Message{Value: map[string]string{"id": "1"}, Options: &outbox.StageOptions{Kind: "orders.placed"}},
		outbox.Message{Value: map[string]string{"id": "2"}, Options: &outbox.StageOptions{Kind: "orders.placed"}})
	_ = tx.Commit()

	var rm metricdata.ResourceMetrics
	_ = reader.Collect(ctx, &rm)
	for _, m := range rm.ScopeMetrics[0].Metrics {
		if g, ok := m.Data.(metricdata.Gauge[int64]); ok {
			p := g.DataPoints[0]
			table, _ := p.Attributes.Value(outbox.AttrTable)
			fmt.Printf("%s{%s=%q} %d\n", m.Name, outbox.AttrTable, table.AsString(), p.Value)
		}
	}
	// Output:
	// tailrace.outbox.pending{outbox.table="tailrace_outbox"} 2
	// tailrace.outbox.dead_letters{outbox.table="tailrace_outbox"} 0
	// tailrace.outbox.relays.live{outbox.table="tailrace_outbox"} 0
}
