package nats

import (
	"errors"
	"fmt"
	"strings"
	"time"

	nc "github.com/nats-io/nats.go"
)

// ErrConsumerMismatch is wrapped by the error Subscribe returns when a
// consumer group's durable consumer exists with a configuration this
// subscriber cannot use. The error says what differs.
var ErrConsumerMismatch = errors.New("bus/nats: existing consumer does not match")

// ConsumerName is the name of the durable consumer that the subscribers of
// topic in consumer group share: group and topic joined by '_', with the
// characters names refuse replaced by '_' (as in StreamName).
func ConsumerName(group, topic string) string {
	return StreamName(group + "_" + topic)
}

// groupConsumer is the durable consumer of one consumer group on one topic.
type groupConsumer struct {
	stream, name, group, topic string
	ackWait                    time.Duration
	maxAckPending              int
}

// config is the configuration a new consumer is created with. The deliver
// subject is derived from the stream and consumer names, not random, so
// that members creating the consumer at the same time send the same
// configuration: the server then treats the second create as a no-op
// instead of updating the consumer's deliver subject under the first.
func (g *groupConsumer) config(inboxPrefix string) *nc.ConsumerConfig {
	return &nc.ConsumerConfig{
		Durable:        g.name,
		DeliverSubject: inboxPrefix + "tailrace." + g.stream + "." + g.name,
		DeliverGroup:   g.group,
		FilterSubject:  g.topic,
		DeliverPolicy:  nc.DeliverAllPolicy,
		AckPolicy:      nc.AckExplicitPolicy,
		AckWait:        g.ackWait,
		MaxAckPending:  g.maxAckPending,
		ReplayPolicy:   nc.ReplayInstantPolicy,
	}
}

// ensure makes sure the consumer exists and fits: it looks the consumer up,
// creates it when missing and checks it. Every member of the group runs
// this on Subscribe, possibly at the same time and in different processes:
// a create that loses the race is not an error, the winner's consumer is
// looked up and checked instead.
//
// The consumer is created here with the management API, never by nats.go's
// subscribe: nats.go deletes a consumer it created itself when that
// subscription is unsubscribed, which would cut the other members off and
// lose the group's position.
func (g *groupConsumer) ensure(js nc.JetStreamManager, inboxPrefix string) error {
	info, err := js.ConsumerInfo(g.stream, g.name)
	if errors.Is(err, nc.ErrConsumerNotFound) {
		info, err = js.AddConsumer(g.stream, g.config(inboxPrefix))
		if err != nil && alreadyExists(err) {
			info, err = js.ConsumerInfo(g.stream, g.name)
		}
		if err != nil {
			return fmt.Errorf("bus/nats: create consumer %q on stream %q for group %q: %w", g.name, g.stream, g.group, err)
		}
	} else if err != nil {
		return fmt.Errorf("bus/nats: look up consumer %q on stream %q for group %q: %w", g.name, g.stream, g.group, err)
	}
	return g.check(info)
}

// alreadyExists reports whether a create failed because another member
// created the consumer in the meantime (possibly with another deliver
// subject, for instance an older version's random inbox).
func alreadyExists(err error) bool {
	var apiErr *nc.APIError
	if errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == nc.JSErrCodeConsumerAlreadyExists || apiErr.ErrorCode == nc.JSErrCodeConsumerNameExists) {
		return true
	}
	// nats.go's AddConsumer looks the consumer up first and refuses one
	// whose configuration differs; check then says how.
	return errors.Is(err, nc.ErrConsumerNameAlreadyInUse)
}

// check compares an existing consumer with what the group's subscribers
// need. The deliver policy is not compared: it only decides where a new
// consumer starts, and an existing one keeps its position.
func (g *groupConsumer) check(info *nc.ConsumerInfo) error {
	c := info.Config
	var diffs []string
	if c.DeliverSubject == "" {
		diffs = append(diffs, "it is a pull consumer (no deliver subject), subscribers need a push consumer")
	}
	if c.DeliverGroup != g.group {
		diffs = append(diffs, fmt.Sprintf("deliver group is %q, want %q (the ConsumerGroup)", c.DeliverGroup, g.group))
	}
	filters := c.FilterSubjects
	if c.FilterSubject != "" {
		filters = append([]string{c.FilterSubject}, filters...)
	}
	if len(filters) != 1 || filters[0] != g.topic {
		diffs = append(diffs, fmt.Sprintf("filter subject is %q, want %q (the topic)", strings.Join(filters, ","), g.topic))
	}
	if c.AckPolicy != nc.AckExplicitPolicy {
		diffs = append(diffs, fmt.Sprintf("ack policy is %q, want %q", c.AckPolicy, nc.AckExplicitPolicy))
	}
	if c.AckWait != g.ackWait {
		diffs = append(diffs, fmt.Sprintf("ack wait is %v, want %v (Config.AckWait; JetStreamManager.UpdateConsumer can change it and keep the position)", c.AckWait, g.ackWait))
	}
	if c.Heartbeat > 0 || c.FlowControl {
		diffs = append(diffs, "idle heartbeat or flow control is on, which queue subscriptions cannot use")
	}
	if len(diffs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: consumer %q on stream %q (ConsumerGroup %q, topic %q): %s; "+
		"delete the consumer (nats consumer rm %s %s, or JetStreamManager.DeleteConsumer; "+
		"the group's position is lost and the next subscriber recreates it from the stream's first message) "+
		"or use another ConsumerGroup",
		ErrConsumerMismatch, g.name, g.stream, g.group, g.topic, strings.Join(diffs, "; "), g.stream, g.name)
}

// inboxPrefix is the prefix of the connection's inboxes ("_INBOX." unless
// nats.CustomInboxPrefix is set), under which deliver subjects are put so
// that permissions written for inboxes cover them.
func inboxPrefix(conn *nc.Conn) string {
	inbox := conn.NewInbox()
	return inbox[:strings.LastIndexByte(inbox, '.')+1]
}
