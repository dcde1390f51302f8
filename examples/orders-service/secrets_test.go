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
		{"postgres flag unreachable", []string{"--postgres", "postgres://u:" + mark + "@127.0.0.1:1/d?connect_timeout=2"}, nil, "", false},
		{"postgres flag bad escape", []string{"--postgres", "postgres://u:" + mark + "%zz@127.0.0.1:1/d"}, nil, "", false},
		{"postgres flag key=value", []string{"--postgres", "host=127.0.0.1 port=1 user=u password=" + mark + " dbname=d"}, nil, "", false},
		{"postgres env unreachable", nil, map[string]string{"TAILRACE_POSTGRES_URL": "postgres://u:" + mark + "@127.0.0.1:1/d?connect_timeout=2"}, "", false},
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
		starts := !strings.Contains(a, "%")
		cases = append(cases,
			tc{"amqp flag " + strings.ReplaceAll(a, mark, "PW"), []string{"--postgres", pg, "--policy", "policy.json", "--amqp", a, "--addr", "127.0.0.1:0"}, nil, "amqp", starts},
			tc{"amqp env " + strings.ReplaceAll(a, mark, "PW"), []string{"--postgres", pg, "--policy", "policy.json", "--addr", "127.0.0.1:0"}, map[string]string{"TAILRACE_AMQP_URL": a}, "amqp", starts})
	}
	for _, n := range []string{"nats://u:" + mark + "@127.0.0.1:1", "nats://u:" + mark + "%zz@127.0.0.1:1"} {
		starts := !strings.Contains(n, "%")
		cases = append(cases,
			tc{"nats flag " + strings.ReplaceAll(n, mark, "PW"), []string{"--postgres", pg, "--policy", "policy.json", "--nats", n, "--addr", "127.0.0.1:0"}, nil, "nats", starts},
			tc{"nats env " + strings.ReplaceAll(n, mark, "PW"), []string{"--postgres", pg, "--policy", "policy.json", "--addr", "127.0.0.1:0"}, map[string]string{"TAILRACE_NATS_URL": n}, "nats", starts})
	}
	runNoSecretCases(t, mark, cases)
}

type tc struct {
	name string
	args []string
	env  map[string]string
	// want is a word the error must hold (which part failed); "" for any.
	want string
	// starts: a well-formed URL of a broker that cannot be reached. The
	// publishers then connect in the background (issue 15), so the service
	// runs; it is stopped after a few seconds and only its output is
	// checked.
	starts bool
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
			timeout := 60 * time.Second
			if c.starts {
				timeout = 3 * time.Second
			}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			var err error
			logs := captureStderr(t, func() { err = run(ctx, c.args) })
			if c.starts {
				if err != nil && strings.Contains(err.Error(), "MARKER") {
					t.Fatalf("the password is printed: %v", err)
				}
				if strings.Contains(logs, "MARKER") {
					t.Fatalf("the password is printed:\nlog:\n%s", logs)
				}
				return
			}
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
