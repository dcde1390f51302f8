package main

import (
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tailrace/tailrace/internal/testenv"
)

// captureStderr runs f with os.Stderr (where the service logs) redirected
// and returns what was written.
func captureStderr(t *testing.T, f func()) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stderr
	os.Stderr = w
	out := make(chan string)
	go func() { b, _ := io.ReadAll(r); out <- string(b) }()
	defer func() { os.Stderr = old }()
	f()
	_ = w.Close()
	return <-out
}

// TestNoSecretInOutput starts the service with connection strings carrying
// a marker password that cannot work — malformed, unreachable, refused —
// through flags and environment variables, and checks that neither the
// returned error nor the log contains the marker.
func TestNoSecretInOutput(t *testing.T) {
	const mark = "Zq7MARKER9x"
	cases := []tc{
		{"postgres flag unreachable", []string{"--postgres", "postgres://u:" + mark + "@127.0.0.1:1/d?connect_timeout=2"}, nil, ""},
		{"postgres flag bad escape", []string{"--postgres", "postgres://u:" + mark + "%zz@127.0.0.1:1/d"}, nil, ""},
		{"postgres flag key=value", []string{"--postgres", "host=127.0.0.1 port=1 user=u password=" + mark + " dbname=d"}, nil, ""},
		{"postgres env unreachable", nil, map[string]string{"TAILRACE_POSTGRES_URL": "postgres://u:" + mark + "@127.0.0.1:1/d?connect_timeout=2"}, ""},
	}
	runNoSecretCases(t, mark, cases)
}

// TestNoSecretInOutputBrokers is TestNoSecretInOutput for the broker URLs,
// which the service reaches only once its database works.
func TestNoSecretInOutputBrokers(t *testing.T) {
	const mark = "Zq7MARKER9x"
	pg := testenv.NewPostgres(t).URL
	var cases []tc
	for _, a := range []string{"amqp://u:" + mark + "@127.0.0.1:1/", "amqp://u:" + mark + "%zz@127.0.0.1:1/", "amqp://u:%" + mark + "@127.0.0.1:1/"} {
		cases = append(cases,
			tc{"amqp flag " + strings.ReplaceAll(a, mark, "PW"), []string{"--postgres", pg, "--amqp", a, "--addr", "127.0.0.1:0"}, nil, "amqp"},
			tc{"amqp env " + strings.ReplaceAll(a, mark, "PW"), []string{"--postgres", pg, "--addr", "127.0.0.1:0"}, map[string]string{"TAILRACE_AMQP_URL": a}, "amqp"})
	}
	for _, n := range []string{"nats://u:" + mark + "@127.0.0.1:1", "nats://u:" + mark + "%zz@127.0.0.1:1"} {
		cases = append(cases,
			tc{"nats flag " + strings.ReplaceAll(n, mark, "PW"), []string{"--postgres", pg, "--nats", n, "--addr", "127.0.0.1:0"}, nil, "nats"},
			tc{"nats env " + strings.ReplaceAll(n, mark, "PW"), []string{"--postgres", pg, "--addr", "127.0.0.1:0"}, map[string]string{"TAILRACE_NATS_URL": n}, "nats"})
	}
	runNoSecretCases(t, mark, cases)
}

type tc struct {
	name string
	args []string
	env  map[string]string
	// want is a word the error must hold (which part failed); "" for any.
	want string
}

func runNoSecretCases(t *testing.T, mark string, cases []tc) {
	t.Helper()
	_ = mark
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, k := range []string{"TAILRACE_POSTGRES_URL", "TAILRACE_AMQP_URL", "TAILRACE_NATS_URL"} {
				t.Setenv(k, os.Getenv(k))
			}
			for k, v := range c.env {
				t.Setenv(k, v)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			var err error
			logs := captureStderr(t, func() { err = run(ctx, c.args) })
			if err == nil {
				t.Fatal("run succeeded with a broken connection string")
			}
			if !strings.Contains(strings.ToLower(err.Error()), c.want) {
				t.Fatalf("error %q does not come from %s", err, c.want)
			}
			if strings.Contains(err.Error()+logs, "MARKER") {
				t.Fatalf("the password is printed:\nerror: %v\nlog:\n%s", err, logs)
			}
		})
	}
}
