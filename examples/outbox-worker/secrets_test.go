package main

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"
)

// TestNoSecretInError runs the sample with connection strings carrying a
// marker password that cannot work and checks the error does not hold it.
func TestNoSecretInError(t *testing.T) {
	const mark = "Zq7MARKER9x"
	for i, args := range [][]string{
		{"--postgres", "postgres://u:" + mark + "@127.0.0.1:1/d?connect_timeout=2"},
		{"--postgres", "postgres://u:" + mark + "%zz@127.0.0.1:1/d"},
		{"--postgres", "host=127.0.0.1 port=1 user=u password=" + mark + " dbname=d"},
		{"--amqp", "amqp://u:" + mark + "@127.0.0.1:1/"},
		{"--amqp", "amqp://u:" + mark + "%zz@127.0.0.1:1/"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		err := run(ctx, io.Discard, args)
		cancel()
		if err == nil || strings.Contains(err.Error(), "MARKER") {
			t.Errorf("case %d (%s): error %v", i, args[0], err)
		}
	}
}
