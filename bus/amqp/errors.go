package amqp

import (
	"errors"
	"fmt"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace/internal/transport"
)

// Errors returned by Publish. Match them with errors.Is; all but ErrClosed
// and ErrUndeclaredTopic are worth retrying (the relay does). ErrNotConnected,
// ErrConnectionLost, ErrBlocked, ErrPublishTimeout and ErrClosed are failures
// of the transport, not of the message: Publish returns them marked with
// tailrace.Unavailable (tailrace.IsUnavailable reports true).
var (
	// ErrUnroutable: the broker returned the message because no queue is
	// bound to receive it (basic.return with mandatory set). The concrete
	// error is a *ReturnedError.
	ErrUnroutable = errors.New("bus/amqp: message unroutable")
	// ErrNacked: the broker refused the message (basic.nack), for instance
	// because a queue overflowed with reject-publish.
	ErrNacked = errors.New("bus/amqp: message nacked by the broker")
	// ErrNotConnected: the publisher is reconnecting; nothing was sent.
	ErrNotConnected = errors.New("bus/amqp: not connected")
	// ErrConnectionLost: the connection or channel closed after the message
	// was sent and before the broker confirmed it. It may or may not have
	// been stored: retry, and let consumers deduplicate.
	ErrConnectionLost = errors.New("bus/amqp: connection lost before confirm")
	// ErrBlocked: the broker blocked publishing (a memory or disk alarm).
	ErrBlocked = errors.New("bus/amqp: connection blocked by the broker")
	// ErrPublishTimeout: PublishTimeout elapsed before the broker confirmed.
	ErrPublishTimeout = errors.New("bus/amqp: publish timed out")
	// ErrClosed: the publisher was closed.
	ErrClosed = errors.New("bus/amqp: publisher closed")
	// ErrUndeclaredTopic: with DeclareUpFront, the topic is not in
	// Topology.Topics.
	ErrUndeclaredTopic = errors.New("bus/amqp: topic not declared up front")
)

// ReturnedError describes a message the broker returned as unroutable. It
// matches ErrUnroutable.
type ReturnedError struct {
	MessageUUID string
	Exchange    string
	RoutingKey  string
	ReplyCode   uint16
	ReplyText   string
}

func (e *ReturnedError) Error() string {
	return fmt.Sprintf("bus/amqp: message %s returned by exchange %q (routing key %q): %d %s: no queue is bound to receive it",
		e.MessageUUID, e.Exchange, e.RoutingKey, e.ReplyCode, e.ReplyText)
}

// Is makes a ReturnedError match ErrUnroutable.
func (e *ReturnedError) Is(target error) bool { return target == ErrUnroutable }

// transportFailure reports whether err is a failure of the connection to
// the broker rather than of the message: the publisher's own transport
// errors, a connection-level AMQP error (connection forced, frame, channel
// or resource errors, internal error), a closed connection or channel, or
// a network error. Channel-level refusals (content too large, no route,
// access refused, not found, precondition failed, resource locked) are
// about the message or its destination.
func transportFailure(err error) bool {
	for _, target := range []error{ErrNotConnected, ErrConnectionLost, ErrBlocked, ErrPublishTimeout, ErrClosed, amqp091.ErrClosed} {
		if errors.Is(err, target) {
			return true
		}
	}
	var ae *amqp091.Error
	if errors.As(err, &ae) {
		switch ae.Code {
		case amqp091.ContentTooLarge, amqp091.NoRoute, amqp091.NoConsumers, amqp091.AccessRefused,
			amqp091.NotFound, amqp091.ResourceLocked, amqp091.PreconditionFailed, amqp091.InvalidPath:
			return false
		}
		return true
	}
	return transport.Network(err)
}
