package redisstream

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wredis "github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"

	"github.com/tailrace/tailrace/bus/internal/closing"
	"github.com/tailrace/tailrace/bus/internal/secret"
)

// ErrClosed is returned by Subscribe after Close.
var ErrClosed = errors.New("bus/redisstream: subscriber closed")

// claimBatch is how many pending entries one look for idle entries reads.
const claimBatch = 100

// Housekeeping of a group's members, as watermill-redisstream does: every
// checkConsumersInterval, members idle for consumerTimeout with no pending
// entries are deleted (XGROUP DELCONSUMER), so that random Consumer names
// do not pile up in the group.
var (
	checkConsumersInterval = 5 * time.Minute
	consumerTimeout        = 10 * time.Minute
)

// Subscriber reads streams; see the package doc.
//
// It is written on go-redis v9 directly, with watermill-redisstream's
// message format (DefaultMarshallerUnmarshaller, what the Publisher writes),
// instead of delegating to watermill-redisstream's Subscriber, which (v1.4.5)
// hands over one entry and waits for its ack before reading the next.
//
// Delivery:
//   - Entries are handed over on the channel in stream order without waiting
//     for the previous one's ack: up to MaxInFlight per subscription are in
//     flight at once, each settled on its own. Ack sends XACK (with a
//     ConsumerGroup); Nack keeps the entry pending and hands it over again,
//     after NackResendSleep, from this subscription (after the entries
//     already handed over). The message's context is a child of Subscribe's
//     ctx, cancelled once the message is acked or given up.
//   - With a ConsumerGroup, Subscribe creates the group if needed (XGROUP
//     CREATE ... MKSTREAM, from the first entry), then delivers first the
//     entries still pending for this Consumer (from an earlier run with the
//     same name), then new ones (XREADGROUP >). Every ClaimInterval it
//     claims (XCLAIM) entries idle for MaxIdleTime that no subscription here
//     has in flight: those of dead members, and its own left over.
//   - Without a ConsumerGroup, each subscription reads (XREAD) the entries
//     appended after Subscribe returned; nothing is acked.
//   - An entry that cannot be unmarshalled is logged and left pending (it is
//     not lost; it comes again when claimed). Entries read but not handed
//     over when the subscription stops stay pending likewise.
//   - Every 5 minutes, members of the group idle for 10 minutes with no
//     pending entry are deleted from it, as watermill-redisstream does.
//
// Closing, guaranteed:
//   - The channel returned by Subscribe is closed exactly once, after every
//     goroutine that could send on it is done sending. It closes when ctx is
//     done (messages not yet acked are given up at once) or on Close.
//   - Close stops delivery, then waits up to CloseTimeout for the messages
//     already handed over to be acked or nacked — their XACKs still reach
//     the server. Messages still unacked then are given up: they stay
//     pending, and are claimed after MaxIdleTime. Close returns only after
//     every channel returned by Subscribe is closed, then closes the client.
//   - Close may be called more than once and concurrently with Subscribe;
//     Subscribe after Close returns ErrClosed.
//
// Handlers must not wait for Close to return before acking the message they
// hold: Close would wait CloseTimeout for that ack.
type Subscriber struct {
	client redis.UniversalClient
	cfg    Config
	scrub  secret.Scrubber
	logger watermill.LoggerAdapter
	codec  wredis.DefaultMarshallerUnmarshaller

	mu       sync.Mutex // guards closed and the outputs.Add that must precede outputs.Wait
	closed   bool
	closing  chan struct{}  // closed by Close: stop delivering
	abandon  chan struct{}  // closed CloseTimeout after Close: stop waiting for acks
	closeErr error          // written before done is closed
	done     chan struct{}  // closed when Close has finished
	outputs  sync.WaitGroup // one per Subscribe; Done once its channel is closed and its reads ended
}

var _ message.Subscriber = (*Subscriber)(nil)

// NewSubscriber validates cfg and connects. A nil logger logs nothing.
func NewSubscriber(cfg Config, logger watermill.LoggerAdapter) (*Subscriber, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	if cfg.Consumer == "" {
		cfg.Consumer = watermill.NewShortUUID()
	}
	cl, scrub, err := cfg.client(false, logger)
	if err != nil {
		return nil, err
	}
	return &Subscriber{
		client:  cl,
		cfg:     cfg,
		scrub:   scrub,
		logger:  logger.With(watermill.LogFields{"component": "bus/redisstream.Subscriber", "consumer": cfg.Consumer}),
		closing: make(chan struct{}),
		abandon: make(chan struct{}),
		done:    make(chan struct{}),
	}, nil
}

// Subscribe returns the entries of the stream named topic (see ConsumerGroup
// for which ones). The channel closes when ctx is done or on Close; see
// Subscriber for the guarantees.
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	s.outputs.Add(1) // Close's Wait waits for this subscription from here
	s.mu.Unlock()

	o := &output{
		s: s, ctx: ctx, topic: topic,
		ch:       make(chan *message.Message),
		window:   make(chan struct{}, s.cfg.MaxInFlight),
		inFlight: map[string]bool{},
		fields:   watermill.LogFields{"topic": topic},
	}
	readCtx, cancel := context.WithCancel(ctx)
	o.cancelRead = cancel
	o.stop = readCtx.Done()
	go func() { // stop the set-up or read in progress on Close
		select {
		case <-s.closing:
		case <-readCtx.Done():
		}
		cancel()
	}()
	start, err := o.setUp(readCtx)
	if err != nil {
		cancel()
		o.mu.Lock()
		o.closed = true
		close(o.ch)
		o.mu.Unlock()
		s.outputs.Done()
		if s.isClosed() {
			return nil, ErrClosed
		}
		return nil, fmt.Errorf("bus/redisstream: subscribe to %q: %w", topic, s.scrub.Error(err))
	}
	go o.run(readCtx, start)
	return o.ch, nil
}

func (s *Subscriber) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close stops the subscriptions, waits up to CloseTimeout for in-flight
// messages, returns once every channel returned by Subscribe is closed, and
// closes the client. See Subscriber.
func (s *Subscriber) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.done
		return s.closeErr
	}
	s.closed = true
	close(s.closing)
	s.mu.Unlock()
	defer close(s.done)

	closing.Wait(&s.outputs, s.cfg.CloseTimeout, func() {
		s.logger.Info("Messages not acked within CloseTimeout are given up; they stay pending",
			watermill.LogFields{"close_timeout": s.cfg.CloseTimeout.String()})
		close(s.abandon)
	})
	if err := s.client.Close(); err != nil && !errors.Is(err, redis.ErrClosed) {
		s.closeErr = fmt.Errorf("bus/redisstream: close client: %w", s.scrub.Error(err))
	}
	return s.closeErr
}

// output is one Subscribe call: its reader goroutine (run), the goroutines
// settling the messages handed over, and its channel.
//
// A sender (run, or settle handing a nacked message over again) holds
// mu.RLock from its check of closed until its send is done; shutdown sets
// closed and closes ch under mu.Lock, so ch is closed only after every send
// has finished, and a later sender sees closed and sends nothing. stop,
// closed when ctx is done or on Close (before shutdown takes the lock), ends
// sends in progress at once.
//
// window holds one token per message handed over and not yet settled; only
// run puts tokens in, so the free room it reads cannot shrink under it.
type output struct {
	s          *Subscriber
	ctx        context.Context
	topic      string
	ch         chan *message.Message
	stop       <-chan struct{} // the read context's Done: ctx done or Close
	cancelRead context.CancelFunc
	window     chan struct{}
	fields     watermill.LogFields

	mu       sync.RWMutex
	closed   bool
	settling sync.WaitGroup // one per message handed over, until settled or given up

	inFlightMu sync.Mutex
	inFlight   map[string]bool // entry IDs handed over and not settled
}

// setUp creates the consumer group, or finds where a fan-out read starts.
func (o *output) setUp(ctx context.Context) (string, error) {
	cfg := &o.s.cfg
	if cfg.ConsumerGroup != "" {
		err := o.s.client.XGroupCreateMkStream(ctx, o.topic, cfg.ConsumerGroup, "0").Err()
		if err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
			return "", err
		}
		return "0", nil // this consumer's pending entries first
	}
	// The last ID the stream generated, so that entries appended between
	// Subscribe and the first read are not missed (as "$" would).
	info, err := o.s.client.XInfoStream(ctx, o.topic).Result()
	if err != nil {
		if strings.Contains(err.Error(), "no such key") {
			return "0-0", nil
		}
		return "", err
	}
	return info.LastGeneratedID, nil
}

// run reads entries and hands them over until ctx is done or Close, then
// shuts the output down.
func (o *output) run(ctx context.Context, cursor string) {
	defer o.shutdown()
	s, cfg := o.s, &o.s.cfg
	group := cfg.ConsumerGroup != ""
	pending := group // reading this consumer's pending entries (cursor not ">")
	nextClaim := time.Now()
	nextCheck := time.Now().Add(checkConsumersInterval)
	for {
		if group && time.Now().After(nextCheck) {
			nextCheck = time.Now().Add(checkConsumersInterval)
			o.checkConsumers(ctx)
		}
		// Wait for room in the window.
		select {
		case o.window <- struct{}{}:
		case <-ctx.Done():
			return
		}
		free := cap(o.window) - len(o.window) + 1 // the token just taken included
		var (
			msgs []redis.XMessage
			err  error
		)
		switch {
		case group && !pending && !time.Now().Before(nextClaim):
			nextClaim = time.Now().Add(cfg.ClaimInterval)
			msgs, err = o.claim(ctx, free)
			if err == nil && len(msgs) == 0 {
				<-o.window
				continue
			}
		case group:
			var xss []redis.XStream
			args := &redis.XReadGroupArgs{Group: cfg.ConsumerGroup, Consumer: cfg.Consumer,
				Streams: []string{o.topic, cursor}, Count: int64(free)}
			if !pending {
				args.Block = cfg.BlockTime
			}
			xss, err = s.client.XReadGroup(ctx, args).Result()
			if len(xss) > 0 {
				msgs = xss[0].Messages
			}
			if pending {
				if (err == nil || errors.Is(err, redis.Nil)) && len(msgs) == 0 {
					pending, cursor = false, ">" // the pending entries are done; new ones now
				} else if len(msgs) > 0 {
					cursor = msgs[len(msgs)-1].ID
				}
			}
		default:
			var xss []redis.XStream
			xss, err = s.client.XRead(ctx, &redis.XReadArgs{Streams: []string{o.topic, cursor}, Count: int64(free),
				Block: cfg.BlockTime}).Result()
			if len(xss) > 0 {
				msgs = xss[0].Messages
			}
			if len(msgs) > 0 {
				cursor = msgs[len(msgs)-1].ID
			}
		}
		if err != nil && !errors.Is(err, redis.Nil) {
			<-o.window
			if ctx.Err() != nil {
				return
			}
			s.logger.Error("Cannot read stream; trying again", s.scrub.Error(err), o.fields)
			select { // no busy loop while the server is away
			case <-time.After(500 * time.Millisecond):
			case <-ctx.Done():
				return
			}
			continue
		}
		if len(msgs) == 0 {
			<-o.window
			continue
		}
		for i := 1; i < len(msgs); i++ {
			o.window <- struct{}{} // never blocks: at most free entries were read
		}
		for i := range msgs {
			if !o.handOver(ctx, &msgs[i]) {
				for range msgs[i+1:] { // not handed over (msgs[i] released its own): stay pending
					<-o.window
				}
				return
			}
		}
	}
}

// checkConsumers deletes the group's members idle for consumerTimeout that
// hold no pending entry.
func (o *output) checkConsumers(ctx context.Context) {
	s, cfg := o.s, &o.s.cfg
	cs, err := s.client.XInfoConsumers(ctx, o.topic, cfg.ConsumerGroup).Result()
	if err != nil {
		s.logger.Info("Cannot list the group's consumers", watermill.LogFields{"topic": o.topic, "err": s.scrub.Error(err).Error()})
		return
	}
	for _, c := range cs {
		if c.Name == cfg.Consumer || c.Pending > 0 || c.Idle < consumerTimeout {
			continue
		}
		if err := s.client.XGroupDelConsumer(ctx, o.topic, cfg.ConsumerGroup, c.Name).Err(); err != nil {
			s.logger.Info("Cannot delete an idle consumer", watermill.LogFields{"topic": o.topic, "consumer": c.Name,
				"err": s.scrub.Error(err).Error()})
		}
	}
}

// claim takes over up to n entries of the group idle for MaxIdleTime and
// not in flight here.
func (o *output) claim(ctx context.Context, n int) ([]redis.XMessage, error) {
	s, cfg := o.s, &o.s.cfg
	xps, err := s.client.XPendingExt(ctx, &redis.XPendingExtArgs{Stream: o.topic, Group: cfg.ConsumerGroup,
		Idle: cfg.MaxIdleTime, Start: "-", End: "+", Count: claimBatch}).Result()
	if err != nil {
		return nil, err
	}
	var ids []string
	o.inFlightMu.Lock()
	for _, xp := range xps {
		if len(ids) == n {
			break
		}
		if xp.Consumer == cfg.Consumer && o.inFlight[xp.ID] {
			continue
		}
		ids = append(ids, xp.ID)
	}
	o.inFlightMu.Unlock()
	if len(ids) == 0 {
		return nil, nil
	}
	// MinIdle makes sure two members do not claim the same entry.
	msgs, err := s.client.XClaim(ctx, &redis.XClaimArgs{Stream: o.topic, Group: cfg.ConsumerGroup,
		Consumer: cfg.Consumer, MinIdle: cfg.MaxIdleTime, Messages: ids}).Result()
	if errors.Is(err, redis.Nil) {
		err = nil
	}
	return msgs, err
}

// handOver unmarshals one entry and sends it on the channel, then leaves
// the wait for its ack to settle. It reports false when the output stops
// before the entry was handed over. Its window token is released here when
// the entry is not handed over, otherwise by settle.
func (o *output) handOver(ctx context.Context, xm *redis.XMessage) bool {
	s := o.s
	fields := o.fields.Add(watermill.LogFields{"xid": xm.ID})
	if xm.Values == nil { // deleted from the stream (MAXLEN) while pending
		if s.cfg.ConsumerGroup != "" {
			if err := s.client.XAck(ctx, o.topic, s.cfg.ConsumerGroup, xm.ID).Err(); err != nil {
				s.logger.Error("Cannot ack an entry deleted from the stream", s.scrub.Error(err), fields)
			}
		}
		<-o.window
		return true
	}
	msg, err := s.codec.Unmarshal(xm.Values)
	if err != nil {
		s.logger.Error("Cannot unmarshal entry; left pending", err, fields)
		<-o.window
		return true
	}
	fields = fields.Add(watermill.LogFields{"message_uuid": msg.UUID})
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.closed {
		<-o.window
		return false
	}
	mctx, cancel := context.WithCancel(o.ctx)
	msg.SetContext(mctx)
	o.inFlightMu.Lock()
	o.inFlight[xm.ID] = true
	o.inFlightMu.Unlock()
	if !o.send(msg, mctx, fields) {
		cancel()
		o.forget(xm.ID)
		<-o.window
		return false
	}
	o.settling.Add(1) // under mu.RLock: before shutdown's Wait
	go o.settle(xm.ID, msg, mctx, cancel, fields)
	return true
}

// send hands msg over unless the output stops first; the caller holds
// mu.RLock.
func (o *output) send(msg *message.Message, ctx context.Context, fields watermill.LogFields) bool {
	select { // do not hand over once closing, even if a receiver is ready
	case <-o.stop:
		return false
	default:
	}
	select {
	case o.ch <- msg:
		return true
	case <-o.stop:
		o.s.logger.Trace("Closing, message not handed over", fields)
	case <-ctx.Done():
		o.s.logger.Trace("Context done, message not handed over", fields)
	}
	return false
}

func (o *output) forget(id string) {
	o.inFlightMu.Lock()
	delete(o.inFlight, id)
	o.inFlightMu.Unlock()
}

// settle waits for the ack of one message handed over and sends XACK; on
// a nack it hands a copy over again. ctx is the context the message was
// handed over with (the reader may replace the message's own).
func (o *output) settle(id string, msg *message.Message, ctx context.Context, cancel context.CancelFunc, fields watermill.LogFields) {
	defer o.settling.Done()
	defer func() { <-o.window }()
	defer o.forget(id)
	defer cancel()
	s := o.s
	for {
		select {
		case <-msg.Acked():
			if s.cfg.ConsumerGroup == "" {
				return
			}
			// Not ctx: the ack must go out even when the reader's context
			// ends right after the ack.
			actx, acancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.DialTimeout+10*time.Second)
			err := s.client.XAck(actx, o.topic, s.cfg.ConsumerGroup, id).Err()
			acancel()
			if err != nil {
				s.logger.Error("Cannot ack entry; it stays pending and comes again", s.scrub.Error(err), fields)
				return
			}
			s.logger.Trace("Message acked", fields)
			return
		case <-msg.Nacked():
			s.logger.Trace("Message nacked; handing it over again", fields)
			if d := s.cfg.NackResendSleep; d > 0 {
				t := time.NewTimer(d)
				select {
				case <-t.C:
				case <-o.stop:
					t.Stop()
					return
				}
			}
			msg = msg.Copy() // fresh ack and nack
			msg.SetContext(ctx)
			if !o.resend(msg, ctx, fields) {
				return
			}
		case <-s.abandon:
			s.logger.Trace("Closed, message given up before its ack", fields)
			return
		case <-ctx.Done():
			s.logger.Trace("Context done, message given up before its ack", fields)
			return
		}
	}
}

func (o *output) resend(msg *message.Message, ctx context.Context, fields watermill.LogFields) bool {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.closed {
		return false
	}
	return o.send(msg, ctx, fields)
}

// shutdown closes the channel once no send is in progress, waits for the
// messages handed over to be settled or given up, and tells Close.
func (o *output) shutdown() {
	o.cancelRead()
	o.mu.Lock()
	o.closed = true
	close(o.ch)
	o.mu.Unlock()
	o.settling.Wait()
	o.s.outputs.Done()
}
