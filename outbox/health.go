package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

// HealthStatus is the verdict of a health check or of one of its
// components, from best to worst: ok, degraded, unhealthy.
type HealthStatus string

// Health statuses.
const (
	// HealthOK: nothing to report.
	HealthOK HealthStatus = "ok"
	// HealthDegraded: working, but someone should look (a backlog building
	// up, dead letters waiting, a rejected policy file). Still served with
	// HTTP 200, so load balancers keep sending traffic.
	HealthDegraded HealthStatus = "degraded"
	// HealthUnhealthy: messages are not flowing (no live relay, a relay that
	// makes no progress, a backlog past the critical thresholds, the
	// database unreachable). Served with HTTP 503.
	HealthUnhealthy HealthStatus = "unhealthy"
)

func (s HealthStatus) rank() int {
	switch s {
	case HealthOK:
		return 0
	case HealthDegraded:
		return 1
	default:
		return 2
	}
}

func worse(a, b HealthStatus) HealthStatus {
	if b.rank() > a.rank() {
		return b
	}
	return a
}

// Defaults of HealthConfig.
const (
	DefaultHealthPendingDegraded  = 1_000
	DefaultHealthPendingUnhealthy = 10_000
	DefaultHealthAgeDegraded      = time.Minute
	DefaultHealthAgeUnhealthy     = 5 * time.Minute
	DefaultHealthStallAfter       = 2 * time.Minute
	DefaultHealthTimeout          = 5 * time.Second
	DefaultHealthOutageUnhealthy  = 10 * time.Second
)

// RelayOutput is what the health check and the metrics read of a relay
// running in this process: *Relay implements it (Relay.Output).
type RelayOutput interface {
	Output() OutputStatus
}

// HealthConfig configures a Health check. Only Dialect is required.
type HealthConfig struct {
	// Dialect of the outbox database. Required.
	Dialect Dialect
	// Table is the outbox table. Default DefaultTable.
	Table string

	// PendingDegraded and PendingUnhealthy are the numbers of pending
	// (unrelayed) messages at which the check turns degraded and
	// unhealthy. Defaults 1,000 and 10,000; negative disables the
	// threshold.
	PendingDegraded, PendingUnhealthy int
	// AgeDegraded and AgeUnhealthy are the ages of the oldest pending
	// message (the lag of the outbox) at which the check turns degraded
	// and unhealthy. Defaults 1 min and 5 min; negative disables.
	AgeDegraded, AgeUnhealthy time.Duration
	// DeadLettersDegraded and DeadLettersUnhealthy are the numbers of dead
	// letters at which the check turns degraded and unhealthy. Defaults 1
	// (any dead letter degrades: someone must replay or purge it) and
	// disabled; negative disables.
	DeadLettersDegraded, DeadLettersUnhealthy int

	// MinRelays is the number of live relays (heartbeat not expired in the
	// relays table) below which the check is unhealthy. A relay that was
	// stopped unregisters at once; one that died or hangs stops renewing
	// its heartbeat and expires within RelayConfig.LeaseTTL. Default 1;
	// negative disables, for a check in a deployment whose relays run
	// elsewhere and are watched there.
	MinRelays int

	// Progress, when set, is the progress counter of a relay in this
	// process (RelayProgress.Middleware in its RelayConfig.Middlewares).
	// When a message that never failed has been pending for StallAfter and
	// no message was relayed in that time, the check is unhealthy: a relay
	// that is alive (its heartbeat runs) but stuck.
	Progress *RelayProgress
	// StallAfter is how long a relay may go without relaying while
	// messages are pending before it counts as stuck. Default 2 min;
	// keep it above RelayConfig.MaxInterval (a retry backoff is not a
	// stall) and above the poll interval.
	StallAfter time.Duration

	// Relay, when set, is a relay running in this process (a *Relay): the
	// check gains a "publisher" component that reports the relay's output
	// as the relay sees it. It is degraded from the first publish that
	// failed for a reason that is not the message's (tailrace.IsUnavailable:
	// broker unreachable, connection lost, timeout, flow control; see
	// OutputStatus), and unhealthy once such an outage has lasted
	// OutageUnhealthy with messages waiting. It is ok again as soon as a
	// publish gets through. A relay tries a waiting message at once, and a
	// publisher that is not connected fails at once, so an outage with
	// messages waiting turns the component degraded within a second or so
	// and unhealthy within OutageUnhealthy of that (10 s by default: at
	// most 15 s in all, unless a publish hangs up to its own timeout).
	Relay RelayOutput
	// OutageUnhealthy is how long an outage of the relay's output, with
	// messages waiting, keeps the "publisher" component degraded before it
	// turns unhealthy. Default 10 s; negative: degraded only.
	OutageUnhealthy time.Duration

	// Policy, when set, is checked with Healthy (policy.Watcher
	// implements it): a policy file that failed to reload turns the check
	// PolicyFailure (the last good policy stays in use).
	Policy interface{ Healthy() error }
	// PolicyFailure is the status of a failed policy reload. Default
	// HealthDegraded.
	PolicyFailure HealthStatus

	// Timeout bounds one Check. Default 5 s. A check that times out is
	// unhealthy.
	Timeout time.Duration
	// CacheFor serves the last report for this long, so that frequent
	// probes do not each query the database. Default 0 (no cache).
	CacheFor time.Duration
}

func (c *HealthConfig) setDefaults() {
	if c.Table == "" {
		c.Table = DefaultTable
	}
	if c.PendingDegraded == 0 {
		c.PendingDegraded = DefaultHealthPendingDegraded
	}
	if c.PendingUnhealthy == 0 {
		c.PendingUnhealthy = DefaultHealthPendingUnhealthy
	}
	if c.AgeDegraded == 0 {
		c.AgeDegraded = DefaultHealthAgeDegraded
	}
	if c.AgeUnhealthy == 0 {
		c.AgeUnhealthy = DefaultHealthAgeUnhealthy
	}
	if c.DeadLettersDegraded == 0 {
		c.DeadLettersDegraded = 1
	}
	if c.DeadLettersUnhealthy == 0 {
		c.DeadLettersUnhealthy = -1
	}
	if c.MinRelays == 0 {
		c.MinRelays = 1
	}
	if c.StallAfter == 0 {
		c.StallAfter = DefaultHealthStallAfter
	}
	if c.PolicyFailure == "" {
		c.PolicyFailure = HealthDegraded
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultHealthTimeout
	}
	if c.OutageUnhealthy == 0 {
		c.OutageUnhealthy = DefaultHealthOutageUnhealthy
	}
}

// Validate reports every problem of c at once. NewHealth calls it after
// filling in the defaults.
func (c HealthConfig) Validate() error {
	var errs []error
	if c.Dialect == nil {
		errs = append(errs, errors.New("outbox: HealthConfig.Dialect is required: use outbox.PostgreSQL, outbox.MySQL or outbox.SQLite"))
	}
	if err := ValidateTableName(c.Table); err != nil {
		errs = append(errs, fmt.Errorf("outbox: HealthConfig.Table: %w", err))
	}
	if c.PendingDegraded > 0 && c.PendingUnhealthy > 0 && c.PendingUnhealthy < c.PendingDegraded {
		errs = append(errs, fmt.Errorf("outbox: HealthConfig.PendingUnhealthy (%d) is below PendingDegraded (%d)", c.PendingUnhealthy, c.PendingDegraded))
	}
	if c.AgeDegraded > 0 && c.AgeUnhealthy > 0 && c.AgeUnhealthy < c.AgeDegraded {
		errs = append(errs, fmt.Errorf("outbox: HealthConfig.AgeUnhealthy (%s) is below AgeDegraded (%s)", c.AgeUnhealthy, c.AgeDegraded))
	}
	if c.DeadLettersDegraded > 0 && c.DeadLettersUnhealthy > 0 && c.DeadLettersUnhealthy < c.DeadLettersDegraded {
		errs = append(errs, fmt.Errorf("outbox: HealthConfig.DeadLettersUnhealthy (%d) is below DeadLettersDegraded (%d)", c.DeadLettersUnhealthy, c.DeadLettersDegraded))
	}
	if c.StallAfter < 0 {
		errs = append(errs, fmt.Errorf("outbox: HealthConfig.StallAfter must not be negative, got %s", c.StallAfter))
	}
	if c.PolicyFailure != HealthOK && c.PolicyFailure != HealthDegraded && c.PolicyFailure != HealthUnhealthy {
		errs = append(errs, fmt.Errorf("outbox: HealthConfig.PolicyFailure %q is not ok, degraded or unhealthy", c.PolicyFailure))
	}
	if c.Timeout < 0 {
		errs = append(errs, fmt.Errorf("outbox: HealthConfig.Timeout must not be negative, got %s", c.Timeout))
	}
	if c.CacheFor < 0 {
		errs = append(errs, fmt.Errorf("outbox: HealthConfig.CacheFor must not be negative, got %s", c.CacheFor))
	}
	return errors.Join(errs...)
}

// HealthReport is the result of a Check: the overall status (the worst of
// the components') and one entry per component.
type HealthReport struct {
	Status    HealthStatus `json:"status"`
	Table     string       `json:"table"`
	CheckedAt time.Time    `json:"checked_at"`
	// Components, in a fixed order: database, pending, oldest_pending,
	// dead_letters, relays, then relay_progress, publisher and policy when
	// configured.
	Components []HealthComponent `json:"components"`
}

// Component returns the component named name, if the report has it.
func (r HealthReport) Component(name string) (HealthComponent, bool) {
	for _, c := range r.Components {
		if c.Name == name {
			return c, true
		}
	}
	return HealthComponent{}, false
}

// HealthComponent is the verdict on one aspect of the outbox.
type HealthComponent struct {
	Name   string       `json:"name"`
	Status HealthStatus `json:"status"`
	// Message says why, in words.
	Message string `json:"message"`
	// Observed is the figure the verdict is based on (a count, an age in
	// seconds), when there is one.
	Observed any `json:"observed,omitempty"`
}

// Health checks one outbox and its relays. Use Check for the value and the
// Health itself as the net/http handler. Safe for concurrent use.
type Health struct {
	admin *Admin
	cfg   HealthConfig

	mu       sync.Mutex
	cached   HealthReport
	cachedAt time.Time
}

// NewHealth returns the health check of the outbox table cfg.Table in db.
// It does not touch the database.
func NewHealth(db *sql.DB, cfg HealthConfig) (*Health, error) {
	cfg.setDefaults()
	err := cfg.Validate()
	if db == nil {
		err = errors.Join(errors.New("outbox: NewHealth: db is nil"), err)
	}
	if err != nil {
		return nil, err
	}
	a, err := NewAdmin(db, cfg.Dialect, cfg.Table)
	if err != nil {
		return nil, err
	}
	return &Health{admin: a, cfg: cfg}, nil
}

// Check runs the check: a Status of the table (a few cheap queries; see
// Admin.Status) judged against the thresholds, plus the relay progress and
// the policy when configured. It never returns an error: a database that
// cannot be queried is an unhealthy "database" component.
func (h *Health) Check(ctx context.Context) HealthReport {
	if h.cfg.CacheFor > 0 {
		h.mu.Lock()
		defer h.mu.Unlock()
		if !h.cachedAt.IsZero() && time.Since(h.cachedAt) < h.cfg.CacheFor {
			return h.cached
		}
	}
	r := h.check(ctx)
	if h.cfg.CacheFor > 0 {
		h.cached, h.cachedAt = r, time.Now()
	}
	return r
}

func (h *Health) check(ctx context.Context) HealthReport {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.Timeout)
	defer cancel()
	rep := HealthReport{Status: HealthOK, Table: h.cfg.Table, CheckedAt: time.Now().UTC()}
	add := func(c HealthComponent) {
		rep.Components = append(rep.Components, c)
		rep.Status = worse(rep.Status, c.Status)
	}
	st, err := h.admin.Status(ctx)
	if err != nil {
		add(HealthComponent{Name: "database", Status: HealthUnhealthy, Message: err.Error()})
	} else {
		add(HealthComponent{Name: "database", Status: HealthOK, Message: "reachable"})
		add(threshold("pending", st.Pending, h.cfg.PendingDegraded, h.cfg.PendingUnhealthy,
			fmt.Sprintf("%d message(s) pending (%d retrying)", st.Pending, st.Retrying)))
		age := HealthComponent{Name: "oldest_pending", Status: HealthOK, Message: "nothing pending", Observed: st.OldestPendingAge.Seconds()}
		if st.Pending > 0 {
			age.Message = fmt.Sprintf("oldest pending message staged %s ago", st.OldestPendingAge.Round(time.Millisecond))
			switch {
			case h.cfg.AgeUnhealthy > 0 && st.OldestPendingAge >= h.cfg.AgeUnhealthy:
				age.Status = HealthUnhealthy
				age.Message += fmt.Sprintf(" (unhealthy from %s)", h.cfg.AgeUnhealthy)
			case h.cfg.AgeDegraded > 0 && st.OldestPendingAge >= h.cfg.AgeDegraded:
				age.Status = HealthDegraded
				age.Message += fmt.Sprintf(" (degraded from %s)", h.cfg.AgeDegraded)
			}
		}
		add(age)
		add(threshold("dead_letters", st.DeadLetters, h.cfg.DeadLettersDegraded, h.cfg.DeadLettersUnhealthy,
			fmt.Sprintf("%d dead letter(s); list them with `tailrace outbox dead`", st.DeadLetters)))
		add(h.relaysComponent(st))
	}
	if p := h.cfg.Progress; p != nil {
		add(h.progressComponent(p, st, err == nil))
	}
	if h.cfg.Relay != nil {
		add(h.publisherComponent(h.cfg.Relay.Output()))
	}
	if h.cfg.Policy != nil {
		c := HealthComponent{Name: "policy", Status: HealthOK, Message: "last reload succeeded"}
		if perr := h.cfg.Policy.Healthy(); perr != nil {
			c.Status, c.Message = h.cfg.PolicyFailure, "policy reload failed; the last good policy stays in use: "+perr.Error()
		}
		add(c)
	}
	return rep
}

// threshold judges a count against a degraded and an unhealthy threshold
// (non-positive: disabled).
func threshold(name string, n, degraded, unhealthy int, msg string) HealthComponent {
	c := HealthComponent{Name: name, Status: HealthOK, Message: msg, Observed: n}
	switch {
	case unhealthy > 0 && n >= unhealthy:
		c.Status = HealthUnhealthy
		c.Message += fmt.Sprintf(" (unhealthy from %d)", unhealthy)
	case degraded > 0 && n >= degraded:
		c.Status = HealthDegraded
		c.Message += fmt.Sprintf(" (degraded from %d)", degraded)
	}
	return c
}

func (h *Health) relaysComponent(st Status) HealthComponent {
	live := st.LiveRelays()
	c := HealthComponent{Name: "relays", Status: HealthOK, Observed: live,
		Message: fmt.Sprintf("%d live relay(s), %d live partition lease(s)", live, st.LiveLeases())}
	if h.cfg.MinRelays > 0 && live < h.cfg.MinRelays {
		c.Status = HealthUnhealthy
		c.Message = fmt.Sprintf("%d live relay(s), at least %d required: nothing relays this outbox", live, h.cfg.MinRelays)
		for _, r := range st.Relays {
			if !r.Live {
				c.Message += fmt.Sprintf("; relay %s stopped renewing its heartbeat %s ago", r.Owner, st.Now.Sub(r.ExpiresAt).Round(time.Second))
				break
			}
		}
	}
	return c
}

func (h *Health) progressComponent(p *RelayProgress, st Status, known bool) HealthComponent {
	n, last := p.Relayed(), p.LastRelayed()
	since := time.Since(p.since(last))
	c := HealthComponent{Name: "relay_progress", Status: HealthOK, Observed: n,
		Message: fmt.Sprintf("%d message(s) relayed by this process", n)}
	if !last.IsZero() {
		c.Message += fmt.Sprintf(", the last %s ago", since.Round(time.Millisecond))
	}
	// Stuck: a message has waited for the relay (not for a retry) for
	// StallAfter, and the relay relayed nothing in that time.
	waiting := known && st.Pending > st.Retrying && st.OldestFreshAge >= h.cfg.StallAfter
	if waiting && since >= h.cfg.StallAfter {
		c.Status = HealthUnhealthy
		c.Message = fmt.Sprintf("no message relayed for %s while %d are pending: the relay is stuck", since.Round(time.Second), st.Pending)
	}
	return c
}

// publisherComponent judges the relay's output: see HealthConfig.Relay.
func (h *Health) publisherComponent(st OutputStatus) HealthComponent {
	c := HealthComponent{Name: "publisher", Status: HealthOK, Observed: 0.0,
		Message: fmt.Sprintf("publishing works; %d message(s) held by the relay", st.Waiting)}
	if !st.Down {
		return c
	}
	c.Observed = st.For.Seconds()
	c.Status = HealthDegraded
	c.Message = fmt.Sprintf("broker unreachable for %s, %d message(s) waiting; the relay probes with one message at a time and counts no attempt: %s",
		st.For.Round(time.Second), st.Waiting, st.LastError)
	if h.cfg.OutageUnhealthy > 0 && st.For >= h.cfg.OutageUnhealthy && st.Waiting > 0 {
		c.Status = HealthUnhealthy
		c.Message += fmt.Sprintf(" (unhealthy from %s)", h.cfg.OutageUnhealthy)
	}
	return c
}

// ServeHTTP runs Check and writes the report as JSON (Content-Type
// application/json), with HTTP status 200 when the status is ok or
// degraded and 503 Service Unavailable when it is unhealthy, so that load
// balancers and Kubernetes probes act on unhealthy only; read the "status"
// field to tell ok from degraded. HEAD gets the status code alone.
func (h *Health) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rep := h.Check(r.Context())
	code := http.StatusOK
	if rep.Status == HealthUnhealthy {
		code = http.StatusServiceUnavailable
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	if r.Method == http.MethodHead {
		return
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(rep)
}

// RelayProgress counts the messages a relay in this process relayed, for
// the health check's stall detection (HealthConfig.Progress). Add its
// Middleware to RelayConfig.Middlewares. The zero value is ready to use.
type RelayProgress struct {
	relayed atomic.Uint64
	last    atomic.Int64 // unix nanoseconds of the last relayed message
	created atomic.Int64 // unix nanoseconds of the first use
}

// Middleware is a forwarder middleware that counts every message the
// forwarder published successfully.
func (p *RelayProgress) Middleware() message.HandlerMiddleware {
	p.start()
	return func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			out, err := h(msg)
			if err == nil {
				p.relayed.Add(1)
				p.last.Store(time.Now().UnixNano())
			}
			return out, err
		}
	}
}

func (p *RelayProgress) start() { p.created.CompareAndSwap(0, time.Now().UnixNano()) }

// Relayed returns how many messages were relayed.
func (p *RelayProgress) Relayed() uint64 { return p.relayed.Load() }

// LastRelayed returns when the last message was relayed; zero if none was.
func (p *RelayProgress) LastRelayed() time.Time {
	ns := p.last.Load()
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// since is the start of the current quiet period: the last relayed
// message, or the creation of the middleware.
func (p *RelayProgress) since(last time.Time) time.Time {
	if !last.IsZero() {
		return last
	}
	p.start()
	return time.Unix(0, p.created.Load())
}
