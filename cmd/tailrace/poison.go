package main

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	wnats "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/nats"
	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/spf13/cobra"

	"github.com/tailrace/tailrace/bus"
	busamqp "github.com/tailrace/tailrace/bus/amqp"
	busnats "github.com/tailrace/tailrace/bus/nats"
)

func init() { addCommand(newPoisonCmd) }

// poisonFlags are the flags of the poison subcommands.
type poisonFlags struct {
	broker   string
	topic    string
	prefix   string
	json     bool
	limit    int
	maxBytes int
	timeout  time.Duration
}

func (f *poisonFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.broker, "broker", os.Getenv("TAILRACE_BROKER"),
		"the broker holding the poison queue: amqp://user:pass@host:5672/vhost (RabbitMQ) or nats://host:4222 (NATS JetStream); default $TAILRACE_BROKER")
	cmd.Flags().StringVar(&f.topic, "topic", bus.DefaultPoisonTopic, "the consumer's ConsumerConfig.PoisonTopic")
	cmd.Flags().StringVar(&f.prefix, "prefix", "", "prefix your topology puts in front of every topic (queue, exchange, subject), for the poison topic and the destinations alike")
	cmd.Flags().BoolVar(&f.json, "json", false, "print machine-readable JSON")
	cmd.Flags().IntVar(&f.limit, "limit", 100, "look at most at this many poisoned messages")
	cmd.Flags().DurationVar(&f.timeout, "timeout", 2*time.Minute, "give up after this long")
}

// poisoned is a message read from a poison queue.
type poisoned struct {
	msg *message.Message
	// ack removes it from the poison queue (after a replay).
	ack func() error
}

// poisonJSON is one poisoned message in --json output.
type poisonJSON struct {
	UUID          string            `json:"uuid"`
	Kind          string            `json:"kind,omitempty"`
	Destination   string            `json:"destination"`
	Consumer      string            `json:"consumer,omitempty"`
	Attempts      string            `json:"attempts,omitempty"`
	Permanent     string            `json:"permanent,omitempty"`
	PoisonedAt    string            `json:"poisoned_at,omitempty"`
	Reason        string            `json:"reason"`
	Headers       map[string]string `json:"headers"`
	PayloadBytes  int               `json:"payload_bytes"`
	Payload       string            `json:"payload,omitempty"`
	PayloadBase64 string            `json:"payload_base64,omitempty"`
	Truncated     bool              `json:"truncated,omitempty"`
}

func toPoisonJSON(m *message.Message, maxBytes int) poisonJSON {
	j := poisonJSON{UUID: m.UUID, Kind: m.Metadata.Get("kind"), Destination: m.Metadata.Get(bus.MetaPoisonDestination),
		Consumer: m.Metadata.Get(bus.MetaPoisonConsumer), Attempts: m.Metadata.Get(bus.MetaPoisonAttempts),
		Permanent: m.Metadata.Get(bus.MetaPoisonPermanent), PoisonedAt: m.Metadata.Get(bus.MetaPoisonedAt),
		Reason: m.Metadata.Get(bus.MetaPoisonReason), Headers: map[string]string(m.Metadata), PayloadBytes: len(m.Payload)}
	shown := []byte(m.Payload)
	if maxBytes > 0 && len(shown) > maxBytes {
		shown, j.Truncated = shown[:maxBytes], true
	}
	if utf8.Valid(m.Payload) {
		j.Payload = strings.ToValidUTF8(string(shown), "")
	} else {
		j.PayloadBase64 = base64.StdEncoding.EncodeToString(shown)
	}
	return j
}

// poisonMetaKeys are the headers a consumer adds when it poisons a message;
// a replay removes them, so the message goes out as it came in.
var poisonMetaKeys = []string{bus.MetaPoisonReason, bus.MetaPoisonAttempts, bus.MetaPoisonPermanent, bus.MetaPoisonDestination,
	bus.MetaPoisonConsumer, bus.MetaPoisonedAt, "reason_poisoned", "topic_poisoned", "handler_poisoned"}

// poisonQueue reads a poison queue and republishes its messages.
type poisonQueue interface {
	// read calls fn with the messages in the queue, oldest first, up to
	// limit; messages fn does not ack stay in the queue, in place.
	read(ctx context.Context, limit int, fn func(poisoned) error) error
	// publish sends m to topic (the prefix applied) and returns when the
	// broker has it.
	publish(topic string, m *message.Message) error
	close()
}

func openPoison(ctx context.Context, f *poisonFlags) (poisonQueue, error) {
	switch {
	case f.broker == "":
		return nil, errors.New("--broker is required (or set TAILRACE_BROKER)")
	case strings.HasPrefix(f.broker, "amqp://"), strings.HasPrefix(f.broker, "amqps://"):
		return openAMQPPoison(f)
	case strings.HasPrefix(f.broker, "nats://"), strings.HasPrefix(f.broker, "tls://"):
		return openNATSPoison(f)
	}
	return nil, errors.New("--broker: want an amqp://, amqps:// or nats:// URL")
}

// ------------------------------------------------------------------- AMQP

type amqpPoison struct {
	conn  *amqp091.Connection
	queue string
	pub   *busamqp.Publisher
}

func openAMQPPoison(f *poisonFlags) (*amqpPoison, error) {
	prefixed := func(t string) string { return f.prefix + t }
	// The publisher checks the URL (without echoing its password) and
	// publishes with confirms, unroutable messages counting as failures.
	// DeclareNever: an admin tool does not create topology.
	pub, err := busamqp.NewPublisher(busamqp.Config{URL: f.broker, ConnectionName: "tailrace-poison",
		Topology: busamqp.Topology{ExchangeName: prefixed, Declare: busamqp.DeclareNever}}, watermill.NopLogger{})
	if err != nil {
		return nil, &exitError{code: exitInvalid, err: err}
	}
	conn, err := amqp091.DialConfig(f.broker, amqp091.Config{Properties: amqp091.Table{"connection_name": "tailrace-poison"}})
	if err != nil {
		_ = pub.Close()
		return nil, &exitError{code: exitInvalid, err: fmt.Errorf("poison: connect to %s: %w", busamqp.RedactURL(f.broker), err)}
	}
	return &amqpPoison{conn: conn, queue: prefixed(f.topic), pub: pub}, nil
}

func (q *amqpPoison) read(ctx context.Context, limit int, fn func(poisoned) error) error {
	ch, err := q.conn.Channel()
	if err != nil {
		return err
	}
	// Closing the channel requeues every message not acked, in its place.
	defer func() { _ = ch.Close() }()
	st, err := ch.QueueDeclarePassive(q.queue, true, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("poison: RabbitMQ queue %q: %w", q.queue, err)
	}
	n := min(st.Messages, limit)
	if n == 0 {
		return nil
	}
	// Hold them all unacked: prefetch n, so none is redelivered meanwhile.
	if err := ch.Qos(n, 0, false); err != nil {
		return err
	}
	deliveries, err := ch.ConsumeWithContext(ctx, q.queue, "", false, false, false, false, nil)
	if err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		var d amqp091.Delivery
		var ok bool
		select {
		case d, ok = <-deliveries:
		case <-time.After(5 * time.Second):
			return nil // another consumer took the rest
		case <-ctx.Done():
			return ctx.Err()
		}
		if !ok {
			return errors.New("poison: the RabbitMQ channel closed")
		}
		m, err := wamqp.DefaultMarshaler{}.Unmarshal(d)
		if err != nil {
			return fmt.Errorf("poison: message %d of %q: %w", i+1, q.queue, err)
		}
		if err := fn(poisoned{msg: m, ack: func() error { return d.Ack(false) }}); err != nil {
			return err
		}
	}
	return nil
}

func (q *amqpPoison) publish(topic string, m *message.Message) error { return q.pub.Publish(topic, m) }

func (q *amqpPoison) close() {
	_ = q.conn.Close()
	_ = q.pub.Close()
}

// ------------------------------------------------------------------- NATS

type natsPoison struct {
	conn   *nc.Conn
	js     nc.JetStreamContext
	stream string
	pub    *busnats.Publisher
	prefix string
}

func openNATSPoison(f *poisonFlags) (*natsPoison, error) {
	// NoProvision: an admin tool does not create streams.
	pub, err := busnats.NewPublisher(busnats.Config{URL: f.broker, Name: "tailrace-poison", NoProvision: true}, watermill.NopLogger{})
	if err != nil {
		return nil, &exitError{code: exitInvalid, err: err}
	}
	conn, err := nc.Connect(f.broker, nc.Name("tailrace-poison"), nc.NoReconnect())
	if err != nil {
		_ = pub.Close()
		return nil, &exitError{code: exitInvalid, err: fmt.Errorf("poison: connect to NATS: %w", err)}
	}
	js, err := conn.JetStream()
	if err != nil {
		conn.Close()
		_ = pub.Close()
		return nil, err
	}
	return &natsPoison{conn: conn, js: js, stream: busnats.StreamName(f.prefix + f.topic), pub: pub, prefix: f.prefix}, nil
}

// read walks the poison stream by sequence: reading does not consume, and
// an ack deletes the message from the stream (the consumers' positions are
// unaffected).
func (q *natsPoison) read(ctx context.Context, limit int, fn func(poisoned) error) error {
	info, err := q.js.StreamInfo(q.stream, nc.Context(ctx))
	if err != nil {
		return fmt.Errorf("poison: NATS stream %q: %w", q.stream, err)
	}
	seen := 0
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && seen < limit && info.State.Msgs > 0; seq++ {
		raw, err := q.js.GetMsg(q.stream, seq, nc.Context(ctx))
		if errors.Is(err, nc.ErrMsgNotFound) {
			continue // deleted (replayed before)
		}
		if err != nil {
			return fmt.Errorf("poison: NATS stream %q, message %d: %w", q.stream, seq, err)
		}
		m, err := (&wnats.NATSMarshaler{}).Unmarshal(&nc.Msg{Subject: raw.Subject, Header: raw.Header, Data: raw.Data})
		if err != nil {
			return fmt.Errorf("poison: NATS stream %q, message %d: %w", q.stream, seq, err)
		}
		seen++
		seq := seq
		if err := fn(poisoned{msg: m, ack: func() error { return q.js.DeleteMsg(q.stream, seq, nc.Context(ctx)) }}); err != nil {
			return err
		}
	}
	return nil
}

func (q *natsPoison) publish(topic string, m *message.Message) error {
	return q.pub.Publish(q.prefix+topic, m)
}

func (q *natsPoison) close() {
	q.conn.Close()
	_ = q.pub.Close()
}

// ---------------------------------------------------------------- commands

func newPoisonCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "poison",
		Short: "Inspect and replay a consumer's poison queue (RabbitMQ, NATS)",
		Long: `A bus.Consumer publishes a message it gave up on to its poison topic
(ConsumerConfig.PoisonTopic, default tailrace_poison) with the reason, the
attempts and the destination it was consumed from. These commands read that
queue where it lives:

  RabbitMQ (--broker amqp://…): the queue named after the topic (with
  --prefix). list holds the messages unacknowledged while it reads and then
  releases them, so they stay in the queue, in order.
  NATS JetStream (--broker nats://…): the stream named after the topic
  (bus/nats.StreamName). list reads it by sequence without consuming.

replay publishes the selected messages back to the destination they were
consumed from (the same exchange or subject, with the poison headers
removed and the same message UUID, so consumers' inboxes deduplicate), and
removes each from the poison queue only after the broker confirmed it.

Exit status: 0 success, 1 the operation failed or an id was not found, 2
usage error.`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return fmt.Errorf("%s needs a subcommand: list or replay", cmd.CommandPath())
		},
	}
	cmd.AddCommand(newPoisonListCmd(e), newPoisonReplayCmd(e))
	return cmd
}

func newPoisonListCmd(e *env) *cobra.Command {
	var f poisonFlags
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the messages in a poison queue, with reason, headers and payload",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
			defer cancel()
			q, err := openPoison(ctx, &f)
			if err != nil {
				return err
			}
			defer q.close()
			var out []poisonJSON
			if err := q.read(ctx, f.limit, func(p poisoned) error {
				out = append(out, toPoisonJSON(p.msg, f.maxBytes))
				return nil
			}); err != nil {
				return outboxFail(err)
			}
			if f.json {
				return writeJSON(e, struct {
					Messages []poisonJSON `json:"messages"`
				}{append([]poisonJSON{}, out...)})
			}
			for _, j := range out {
				printPoisoned(e.stdout, j)
			}
			fmt.Fprintf(e.stdout, "%d poisoned message(s) shown\n", len(out))
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().IntVar(&f.maxBytes, "max-bytes", 4096, "print at most this many payload bytes per message (0: all)")
	return cmd
}

func printPoisoned(w io.Writer, j poisonJSON) {
	fmt.Fprintf(w, "message %s\n", j.UUID)
	fmt.Fprintf(w, "  kind:        %s\n", j.Kind)
	fmt.Fprintf(w, "  destination: %s\n", j.Destination)
	fmt.Fprintf(w, "  consumer:    %s\n", j.Consumer)
	fmt.Fprintf(w, "  attempts:    %s (permanent: %s)\n", j.Attempts, j.Permanent)
	fmt.Fprintf(w, "  poisoned at: %s\n", j.PoisonedAt)
	fmt.Fprintf(w, "  reason:      %s\n", j.Reason)
	fmt.Fprintf(w, "  headers:\n")
	for _, k := range slices.Sorted(maps.Keys(j.Headers)) {
		if !slices.Contains(poisonMetaKeys, k) {
			fmt.Fprintf(w, "    %s: %s\n", k, j.Headers[k])
		}
	}
	if j.PayloadBase64 != "" {
		fmt.Fprintf(w, "  payload (%d bytes, base64): %s", j.PayloadBytes, j.PayloadBase64)
	} else {
		fmt.Fprintf(w, "  payload (%d bytes): %s", j.PayloadBytes, j.Payload)
	}
	if j.Truncated {
		fmt.Fprintf(w, " … (cut; --max-bytes 0 shows all)")
	}
	fmt.Fprintln(w)
}

func newPoisonReplayCmd(e *env) *cobra.Command {
	var f poisonFlags
	var all bool
	var kind string
	cmd := &cobra.Command{
		Use:   "replay [UUID...] [--kind K] [--all]",
		Short: "Publish poisoned messages back to where they were consumed from",
		Long: `Publish the selected poisoned messages back to the destination they were
consumed from and remove each from the poison queue once the broker has it.
Select by message UUID arguments (as list shows them), --kind, or --all; a
UUID not found among the first --limit messages is named and makes the exit
status 1.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 && kind == "" && !all {
				return errors.New("replay needs message UUIDs, --kind or --all")
			}
			ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
			defer cancel()
			q, err := openPoison(ctx, &f)
			if err != nil {
				return err
			}
			defer q.close()
			want := map[string]bool{}
			for _, a := range args {
				want[a] = false
			}
			n := 0
			err = q.read(ctx, f.limit, func(p poisoned) error {
				m := p.msg
				if _, ok := want[m.UUID]; len(want) > 0 && !ok {
					return nil
				}
				if kind != "" && m.Metadata.Get("kind") != kind {
					return nil
				}
				dest := m.Metadata.Get(bus.MetaPoisonDestination)
				if dest == "" {
					return fmt.Errorf("poison: message %s has no %s header: not from a tailrace consumer", m.UUID, bus.MetaPoisonDestination)
				}
				out := m.Copy()
				for _, k := range poisonMetaKeys {
					delete(out.Metadata, k)
				}
				if err := q.publish(dest, out); err != nil {
					return fmt.Errorf("poison: republish %s to %s: %w (%d replayed before)", m.UUID, dest, err, n)
				}
				if err := p.ack(); err != nil {
					return fmt.Errorf("poison: %s was republished but not removed from the poison queue (it would be replayed again): %w", m.UUID, err)
				}
				if _, ok := want[m.UUID]; ok {
					want[m.UUID] = true
				}
				n++
				if !f.json {
					fmt.Fprintf(e.stderr, "replayed %s to %s\n", m.UUID, dest)
				}
				return nil
			})
			if err != nil {
				return outboxFail(err)
			}
			var missing []string
			for id, found := range want {
				if !found {
					missing = append(missing, id)
				}
			}
			slices.Sort(missing)
			if f.json {
				if err := writeJSON(e, map[string]any{"replayed": n, "not_found": append([]string{}, missing...)}); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(e.stdout, "replayed %d poisoned message(s)\n", n)
			}
			if len(missing) > 0 {
				return &exitError{code: exitInvalid, err: fmt.Errorf("not in the poison queue (within --limit %d): %s", f.limit, strings.Join(missing, ", "))}
			}
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().BoolVar(&all, "all", false, "replay every message (up to --limit)")
	cmd.Flags().StringVar(&kind, "kind", "", "only messages of this kind")
	return cmd
}
