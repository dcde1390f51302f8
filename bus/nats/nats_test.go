package nats_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"
	nc "github.com/nats-io/nats.go"

	busnats "github.com/tailrace/tailrace/bus/nats"
	"github.com/tailrace/tailrace/internal/testenv"
)

// setup returns the NATS URL and deletes, when the test ends, every stream
// whose name starts with prefix.
func setup(t *testing.T, prefix string) string {
	t.Helper()
	url := testenv.NATSURL(t)
	t.Cleanup(func() {
		conn, err := nc.Connect(url)
		if err != nil {
			t.Logf("cleanup: %v", err)
			return
		}
		defer conn.Close()
		js, err := conn.JetStream()
		if err != nil {
			t.Logf("cleanup: %v", err)
			return
		}
		for name := range js.StreamNames() {
			if strings.HasPrefix(name, prefix) {
				if err := js.DeleteStream(name); err != nil {
					t.Logf("cleanup: delete stream %s: %v", name, err)
				}
			}
		}
	})
	return url
}

func TestPublishWithoutStreamFails(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	pub, err := busnats.NewPublisher(busnats.Config{URL: url, NoProvision: true, PublishTimeout: 2 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	err = pub.Publish(prefix+".nostream", message.NewMessage(watermill.NewUUID(), nil))
	if !errors.Is(err, nc.ErrNoStreamResponse) && !errors.Is(err, nc.ErrNoResponders) {
		t.Fatalf("Publish to a subject no stream captures: got %v, want no responders", err)
	}

	prov, err := busnats.NewPublisher(busnats.Config{URL: url}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer prov.Close()
	msg := message.NewMessage(watermill.NewUUID(), []byte("x"))
	for range 2 { // the second copy is deduplicated by Nats-Msg-Id
		if err := prov.Publish(prefix+".orders", msg); err != nil {
			t.Fatalf("Publish with provisioning: %v", err)
		}
	}
	conn, _ := nc.Connect(url)
	defer conn.Close()
	js, _ := conn.JetStream()
	info, err := js.StreamInfo(busnats.StreamName(prefix + ".orders"))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 1 || info.Config.Storage != nc.FileStorage {
		t.Fatalf("stream holds %d messages (want 1, deduplicated), storage %v", info.State.Msgs, info.Config.Storage)
	}
}

func TestSecretsNeverLeak(t *testing.T) {
	const pw = "Tr0ub4dor%zz3"
	var out []string
	for _, url := range []string{
		"nats://user:" + pw + "@127.0.0.1:4222",
		"nats://user:" + strings.ReplaceAll(pw, "%", "") + "@127.0.0.1:1",
	} {
		_, err := busnats.NewPublisher(busnats.Config{URL: url, ConnectTimeout: time.Second}, nil)
		if err == nil {
			t.Fatalf("connected to %s", url)
		}
		_, err2 := busnats.NewSubscriber(busnats.Config{URL: url, ConnectTimeout: time.Second}, nil)
		out = append(out, err.Error(), err2.Error())
	}
	text := strings.Join(out, "\n")
	for _, s := range []string{pw, "Tr0ub4dor"} {
		if strings.Contains(text, s) {
			t.Errorf("errors contain %q:\n%s", s, text)
		}
	}
	if !strings.Contains(text, "***") {
		t.Errorf("no redacted URL in:\n%s", text)
	}
}

func TestUniversalPubSub(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	constructor := func(t *testing.T, group string) (message.Publisher, message.Subscriber) {
		cfg := busnats.Config{URL: url, ConsumerGroup: group}
		if group != "" {
			cfg.Subscribers = 2
		}
		pub, err := busnats.NewPublisher(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		sub, err := busnats.NewSubscriber(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		return pub, sub
	}
	tests.TestPubSub(t,
		tests.Features{
			ConsumerGroups:                      true,
			ExactlyOnceDelivery:                 false,
			GuaranteedOrder:                     true,
			GuaranteedOrderWithSingleSubscriber: true,
			Persistent:                          true,
			NewSubscriberReceivesOldMessages:    true,
			ForceShort:                          true,
			GenerateTopicFunc: func(tctx tests.TestContext) string {
				return prefix + "_" + string(tctx.TestID)
			},
		},
		func(t *testing.T) (message.Publisher, message.Subscriber) { return constructor(t, "") },
		constructor,
	)
}
