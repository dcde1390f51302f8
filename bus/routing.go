package bus

import (
	"container/list"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/policy"
)

// Defaults of RoutingConfig.
const (
	DefaultRoutingConcurrency = 8
	DefaultRoutingMaxTracked  = 10000
	DefaultRoutingTrackTTL    = time.Hour
)

// TopicPlaceholder is a route Destination that stands for the topic the
// message was staged with (outbox.StageOptions.Topic, by default its kind):
// a policy route {"Key": "local", "Destination": "{topic}"} publishes every
// message it matches to its own staged topic.
const TopicPlaceholder = "{topic}"

// ErrRoutingClosed is returned by Publish after Close.
var ErrRoutingClosed = errors.New("bus: routing publisher closed")

// RoutingConfig configures a RoutingPublisher. The zero value is the
// recommended default.
type RoutingConfig struct {
	// Concurrency is the most routes of one message published at once.
	// A message with a single route is published on the caller's
	// goroutine. Default DefaultRoutingConcurrency (8).
	Concurrency int
	// MaxTracked bounds how many messages with routes still to deliver
	// (some routes succeeded, others failed) are remembered for the
	// relay's retry. When full, the oldest is forgotten: its next retry
	// publishes to every route again, and consumers' inbox drops the
	// duplicate. Default DefaultRoutingMaxTracked (10,000).
	MaxTracked int
	// TrackTTL is how long that memory lasts for one message. It should
	// exceed the relay's whole retry schedule. Default
	// DefaultRoutingTrackTTL (1 h).
	TrackTTL time.Duration
}

func (c *RoutingConfig) setDefaults() {
	if c.Concurrency == 0 {
		c.Concurrency = DefaultRoutingConcurrency
	}
	if c.MaxTracked == 0 {
		c.MaxTracked = DefaultRoutingMaxTracked
	}
	if c.TrackTTL == 0 {
		c.TrackTTL = DefaultRoutingTrackTTL
	}
}

// Validate reports every problem of c at once. NewRoutingPublisher calls it
// after filling in the defaults.
func (c RoutingConfig) Validate() error {
	var errs []error
	if c.Concurrency < 1 {
		errs = append(errs, fmt.Errorf("bus: RoutingConfig.Concurrency must be positive, got %d", c.Concurrency))
	}
	if c.MaxTracked < 1 {
		errs = append(errs, fmt.Errorf("bus: RoutingConfig.MaxTracked must be positive, got %d", c.MaxTracked))
	}
	if c.TrackTTL <= 0 {
		errs = append(errs, fmt.Errorf("bus: RoutingConfig.TrackTTL must be positive, got %v", c.TrackTTL))
	}
	return errors.Join(errs...)
}

// RouteError is the failure of one route of a message.
type RouteError struct {
	Key         string
	Destination string
	Err         error
}

func (e *RouteError) Error() string {
	return fmt.Sprintf("route %s -> %s: %v", e.Key, e.Destination, e.Err)
}

func (e *RouteError) Unwrap() error { return e.Err }

// PublishError reports the routes of one message that failed. The routes
// not listed were delivered, and a retry of the same message (same UUID)
// does not publish to them again.
//
// When every failed route failed permanently, Publish wraps the
// PublishError in tailrace.Permanent, so the relay dead-letters the message.
// When at least one failure is transient, the error is transient as a
// whole (Unwrap returns only the transient failures, so
// tailrace.IsPermanent is false): the relay retries, and a permanently
// failing route keeps failing until the relay's MaxAttempts dead-letters
// the message.
type PublishError struct {
	MessageID string
	Kind      string
	// Routes is the number of routes the message had; Failed the ones that
	// failed in this call.
	Routes int
	Failed []*RouteError
}

func (e *PublishError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "bus: message %s (kind %q): %d of %d routes failed", e.MessageID, e.Kind, len(e.Failed), e.Routes)
	for _, f := range e.Failed {
		b.WriteString("; ")
		b.WriteString(f.Error())
	}
	return b.String()
}

// Unwrap returns the route failures the relay should judge the message by:
// all of them when each is permanent, otherwise only the transient ones.
func (e *PublishError) Unwrap() []error {
	var transient, all []error
	for _, f := range e.Failed {
		all = append(all, f)
		if !tailrace.IsPermanent(f.Err) {
			transient = append(transient, f)
		}
	}
	if len(transient) > 0 {
		return transient
	}
	return all
}

func (e *PublishError) allPermanent() bool {
	for _, f := range e.Failed {
		if !tailrace.IsPermanent(f.Err) {
			return false
		}
	}
	return true
}

// RoutingPublisher is the message.Publisher the outbox relay forwards to: for
// each message it asks the current routing policy where the message goes and
// publishes a copy to each route — a publisher of the Registry, by key, at
// the route's destination.
//
// The topic Publish receives (the destination the message was staged with,
// outbox.StageOptions.Topic, by default its kind) does not choose the
// destination: the policy does. It is used only by routes whose Destination
// is TopicPlaceholder ("{topic}").
//
// Every outgoing copy carries tailrace.MetaPolicyVersion (the policy's
// content hash) and tailrace.MetaPolicyRule (the rule, or the Continue
// rules, that routed it). The policy is read from the Provider for every
// message, so a policy.Watcher's reload applies to the next message.
//
// Delivery is tracked per route. When some routes of a message succeed and
// others fail, Publish returns a *PublishError and remembers, by message
// UUID, which routes were delivered; when the relay retries the message,
// only the others are published again. A healthy route therefore receives
// one copy, however often an unhealthy one is retried, as long as the
// process does not crash. That memory is in-process and bounded (MaxTracked
// messages, TrackTTL each) and is dropped once every route succeeded; after
// a crash, or an eviction, a retry publishes to every route again and the
// consumers' inbox removes the duplicate.
//
// Errors: a message no rule routes (policy.ErrNoRoute) and a route whose key
// no publisher is registered under fail permanently (tailrace.Permanent), so
// the relay dead-letters the message at once instead of retrying forever.
// Route failures are reported as described for PublishError.
//
// Routes of one message are published concurrently, at most
// RoutingConfig.Concurrency at a time. A RoutingPublisher is safe for
// concurrent use.
type RoutingPublisher struct {
	reg      *Registry
	policies policy.Provider
	logger   *slog.Logger
	cfg      RoutingConfig

	results sync.Pool // *policy.Result

	mu      sync.Mutex
	tracked map[string]*list.Element // message UUID → *tracked in order
	order   list.List                // oldest first
	closed  bool
	now     func() time.Time
}

// tracked is the delivery state of a message with routes still to deliver.
type tracked struct {
	uuid      string
	delivered map[string]struct{} // routeID → delivered
	expires   time.Time
}

var _ message.Publisher = (*RoutingPublisher)(nil)

// NewRoutingPublisher returns a publisher that routes each message with the
// policy policies provides, to the publishers of reg. A nil logger
// discards.
func NewRoutingPublisher(reg *Registry, policies policy.Provider, logger *slog.Logger, cfg RoutingConfig) (*RoutingPublisher, error) {
	cfg.setDefaults()
	err := cfg.Validate()
	if reg == nil {
		err = errors.Join(errors.New("bus: NewRoutingPublisher needs a *Registry"), err)
	}
	if policies == nil {
		err = errors.Join(errors.New("bus: NewRoutingPublisher needs a policy.Provider"), err)
	}
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	p := &RoutingPublisher{
		reg: reg, policies: policies, logger: logger, cfg: cfg,
		tracked: make(map[string]*list.Element),
		now:     time.Now,
	}
	p.results.New = func() any { return new(policy.Result) }
	return p, nil
}

// routeID names a route in the delivery state.
func routeID(key, dest string) string { return key + "\x00" + dest }

// Publish routes every message; see RoutingPublisher. It returns the
// messages' errors joined; a message's error is permanent only when
// retrying it cannot help.
func (p *RoutingPublisher) Publish(topic string, msgs ...*message.Message) error {
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		return ErrRoutingClosed
	}
	if len(msgs) == 1 {
		return p.publishOne(topic, msgs[0])
	}
	var errs []error
	for _, m := range msgs {
		if err := p.publishOne(topic, m); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// outgoing is one route to publish a message to.
type outgoing struct {
	key, dest string
	pub       message.Publisher
}

func (p *RoutingPublisher) publishOne(topic string, msg *message.Message) error {
	pol := p.policies.Policy()
	if pol == nil {
		return fmt.Errorf("bus: message %s: the policy provider has no policy", msg.UUID)
	}
	res := p.results.Get().(*policy.Result)
	defer p.results.Put(res)
	kind := msg.Metadata.Get(tailrace.MetaKind)
	if err := pol.ResolveInto(msg.Metadata, res); err != nil {
		if errors.Is(err, policy.ErrNoRoute) {
			return tailrace.Permanent(fmt.Errorf("bus: message %s (kind %q): %w under policy %s", msg.UUID, kind, err, pol.Version()))
		}
		return fmt.Errorf("bus: message %s (kind %q): %w", msg.UUID, kind, err)
	}
	version, rule := res.Version, res.RuleStamp()
	done := p.delivered(msg.UUID)

	// The common case: one route, first attempt. Stamp and publish the
	// message itself, on this goroutine, without any bookkeeping.
	if len(res.Routes) == 1 && done == nil {
		r := res.Routes[0]
		dest := r.Destination
		if dest == TopicPlaceholder {
			dest = topic
		}
		if pub, ok := p.reg.Publisher(r.Key); ok {
			msg.Metadata.Set(tailrace.MetaPolicyVersion, version)
			msg.Metadata.Set(tailrace.MetaPolicyRule, rule)
			err := pub.Publish(dest, msg)
			if err == nil {
				return nil
			}
			return p.fail(msg, kind, 1, nil, []*RouteError{{Key: r.Key, Destination: dest, Err: err}})
		}
	}

	// The routes still to publish, with their publishers. Unknown keys fail
	// permanently; they are reported with the other failures below.
	var (
		todo   = make([]outgoing, 0, len(res.Routes))
		failed []*RouteError
	)
	for _, r := range res.Routes {
		dest := r.Destination
		if dest == TopicPlaceholder {
			dest = topic
		}
		if done != nil {
			if _, ok := done[routeID(r.Key, dest)]; ok {
				continue
			}
		}
		pub, ok := p.reg.Publisher(r.Key)
		if !ok {
			failed = append(failed, &RouteError{Key: r.Key, Destination: dest,
				Err: tailrace.Permanent(fmt.Errorf("%w %q (policy %s, rule %s)", ErrUnknownPublisher, r.Key, version, rule))})
			continue
		}
		todo = append(todo, outgoing{key: r.Key, dest: dest, pub: pub})
	}

	var delivered []string
	for i, err := range p.fanOut(msg, todo, version, rule) {
		if err != nil {
			failed = append(failed, &RouteError{Key: todo[i].key, Destination: todo[i].dest, Err: err})
		} else {
			delivered = append(delivered, routeID(todo[i].key, todo[i].dest))
		}
	}
	if len(failed) == 0 {
		if done != nil {
			p.forget(msg.UUID)
		}
		return nil
	}
	return p.fail(msg, kind, len(res.Routes), delivered, failed)
}

// fail remembers the routes delivered so far for the relay's retry, logs the
// failed ones and returns the message's error.
func (p *RoutingPublisher) fail(msg *message.Message, kind string, routes int, delivered []string, failed []*RouteError) error {
	p.remember(msg.UUID, delivered)
	for _, f := range failed {
		p.logger.Warn("bus: route failed",
			slog.String("message_id", msg.UUID), slog.String("kind", kind),
			slog.String("publisher", f.Key), slog.String("destination", f.Destination),
			slog.Bool("permanent", tailrace.IsPermanent(f.Err)), slog.String("error", f.Err.Error()))
	}
	perr := &PublishError{MessageID: msg.UUID, Kind: kind, Routes: routes, Failed: failed}
	if perr.allPermanent() {
		return tailrace.Permanent(perr)
	}
	return perr
}

// fanOut publishes a stamped copy of msg to every route in todo, at most
// Concurrency at a time (the caller's goroutine takes the first route), and
// returns each route's error.
func (p *RoutingPublisher) fanOut(msg *message.Message, todo []outgoing, version, rule string) []error {
	errs := make([]error, len(todo))
	publish := func(i int) {
		c := msg.Copy()
		c.SetContext(msg.Context())
		c.Metadata.Set(tailrace.MetaPolicyVersion, version)
		c.Metadata.Set(tailrace.MetaPolicyRule, rule)
		errs[i] = todo[i].pub.Publish(todo[i].dest, c)
	}
	if len(todo) <= 1 {
		for i := range todo {
			publish(i)
		}
		return errs
	}
	// Concurrency-1 helpers plus this goroutine.
	sem := make(chan struct{}, p.cfg.Concurrency-1)
	var wg sync.WaitGroup
	for i := 1; i < len(todo); i++ {
		if p.cfg.Concurrency == 1 {
			publish(i)
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			publish(i)
		}()
		if i == 1 {
			publish(0)
		}
	}
	if p.cfg.Concurrency == 1 {
		publish(0)
	}
	wg.Wait()
	return errs
}

// delivered returns the routes already delivered for the message, or nil.
func (p *RoutingPublisher) delivered(uuid string) map[string]struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.tracked) == 0 {
		return nil
	}
	el, ok := p.tracked[uuid]
	if !ok {
		return nil
	}
	t := el.Value.(*tracked)
	if p.now().After(t.expires) {
		p.order.Remove(el)
		delete(p.tracked, uuid)
		return nil
	}
	// A copy: the caller reads it without the lock.
	out := make(map[string]struct{}, len(t.delivered))
	for k := range t.delivered {
		out[k] = struct{}{}
	}
	return out
}

// remember adds routes to the delivered set of the message, evicting
// expired and, past MaxTracked, the oldest entries.
func (p *RoutingPublisher) remember(uuid string, routes []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	el, ok := p.tracked[uuid]
	if !ok {
		t := &tracked{uuid: uuid, delivered: make(map[string]struct{}, len(routes)), expires: now.Add(p.cfg.TrackTTL)}
		el = p.order.PushBack(t)
		p.tracked[uuid] = el
	}
	t := el.Value.(*tracked)
	for _, r := range routes {
		t.delivered[r] = struct{}{}
	}
	for p.order.Len() > 0 {
		front := p.order.Front()
		ft := front.Value.(*tracked)
		if p.order.Len() <= p.cfg.MaxTracked && !now.After(ft.expires) {
			break
		}
		if len(ft.delivered) > 0 && !now.After(ft.expires) {
			p.logger.Warn("bus: delivery state evicted (RoutingConfig.MaxTracked reached); a retry will publish to every route again",
				slog.String("message_id", ft.uuid), slog.Int("max_tracked", p.cfg.MaxTracked))
		}
		p.order.Remove(front)
		delete(p.tracked, ft.uuid)
	}
}

// forget drops the delivery state of a message whose routes all succeeded.
func (p *RoutingPublisher) forget(uuid string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if el, ok := p.tracked[uuid]; ok {
		p.order.Remove(el)
		delete(p.tracked, uuid)
	}
}

// Tracked returns the number of messages whose delivery state is held
// (some routes delivered, others still to retry). For health pages and
// tests.
func (p *RoutingPublisher) Tracked() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.tracked)
}

// Close makes further Publish calls fail with ErrRoutingClosed and drops the
// delivery state. It does not close the Registry's publishers: the Registry
// owns them (Registry.Close). Close is idempotent.
func (p *RoutingPublisher) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	p.tracked = map[string]*list.Element{}
	p.order.Init()
	return nil
}
