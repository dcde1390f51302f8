package policy

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Provider hands out the current policy. The routing publisher asks it for
// every message, so implementations must be cheap and safe for concurrent
// use. *Watcher implements it; Static wraps a fixed policy.
type Provider interface {
	Policy() *Policy
}

type static struct{ p *Policy }

func (s static) Policy() *Policy { return s.p }

// Static returns a Provider that always returns p.
func Static(p *Policy) Provider { return static{p} }

// DefaultDebounce is WatcherConfig.Debounce's default.
const DefaultDebounce = 250 * time.Millisecond

// WatcherConfig configures a Watcher.
type WatcherConfig struct {
	// Paths are the policy files and directories, as for Load. Required.
	Paths []string
	// Load is passed to Load on every (re)load. Default nil.
	Load *LoadOptions
	// Debounce is how long the watcher waits after the last file event
	// before reloading, so that an editor's or a deployment's burst of
	// writes causes one reload. Default DefaultDebounce (250 ms).
	Debounce time.Duration
	// OnReload, when set, is called after a reload attempt triggered by a
	// change or Reload (not the initial load): with the new policy when one
	// was swapped in, or with the error when the change was rejected. A
	// change that leaves the Version as it was is not reported. Calls are
	// serialized; OnReload must not call Reload. Default nil.
	OnReload func(p *Policy, err error)
}

func (c *WatcherConfig) setDefaults() {
	if c.Debounce == 0 {
		c.Debounce = DefaultDebounce
	}
}

// Validate reports every problem with the configuration.
func (c *WatcherConfig) Validate() error {
	var errs []error
	if len(c.Paths) == 0 {
		errs = append(errs, errors.New("policy: WatcherConfig.Paths is empty"))
	}
	if c.Debounce < 0 {
		errs = append(errs, fmt.Errorf("policy: WatcherConfig.Debounce %v is negative", c.Debounce))
	}
	return errors.Join(errs...)
}

// WatchStatus is a Watcher's state, for health checks and admin pages.
type WatchStatus struct {
	// Version of the policy in use, and when it was loaded.
	Version  string
	LoadedAt time.Time
	// Reloads counts the policies swapped in after the initial load.
	Reloads int
	// Failures counts rejected changes.
	Failures int
	// LastError is why the latest reload attempt failed, or nil when it
	// succeeded; LastErrorAt is when it failed.
	LastError   error
	LastErrorAt time.Time
}

// Watcher keeps a policy loaded from files up to date. It watches the
// directories of its paths (a file's parent directory, so that editors'
// rename-on-save and Kubernetes ConfigMap symlink swaps are seen); after any
// event there and a quiet period (Debounce) it reloads all the paths. A valid
// result whose Version differs is swapped in atomically; an invalid one is
// logged and recorded in Status, and the last good policy stays in use.
type Watcher struct {
	cfg    WatcherConfig
	logger *slog.Logger
	cur    atomic.Pointer[Policy]
	fsw    *fsnotify.Watcher

	mu     sync.Mutex // serializes reloads, guards status
	status WatchStatus

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// NewWatcher loads the policy, failing if it is invalid, and starts watching
// its files. Close stops the watcher. A nil logger means slog.Default().
func NewWatcher(logger *slog.Logger, cfg WatcherConfig) (*Watcher, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.Default()
	}
	p, err := Load(cfg.Paths, cfg.Load)
	if err != nil {
		return nil, err
	}
	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("policy: watch: %w", err)
	}
	dirs := map[string]bool{}
	for _, path := range cfg.Paths {
		dir := path
		if st, err := os.Stat(path); err == nil && !st.IsDir() {
			dir = filepath.Dir(path)
		}
		if dirs[dir] {
			continue
		}
		dirs[dir] = true
		if err := fsw.Add(dir); err != nil {
			fsw.Close()
			return nil, fmt.Errorf("policy: watch %s: %w", dir, err)
		}
	}
	w := &Watcher{cfg: cfg, logger: logger, fsw: fsw, stop: make(chan struct{}), done: make(chan struct{})}
	w.cur.Store(p)
	w.status = WatchStatus{Version: p.Version(), LoadedAt: time.Now()}
	logger.Info("policy: loaded", "version", p.Version(), "files", len(p.files), "rules", len(p.rules))
	go w.loop()
	return w, nil
}

// Policy returns the policy in use. It never returns nil and never blocks.
func (w *Watcher) Policy() *Policy { return w.cur.Load() }

// Status returns the watcher's state.
func (w *Watcher) Status() WatchStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.status
}

// Healthy returns nil when the latest reload attempt succeeded, else an
// error saying since when the files are invalid, which version is still
// served, and why.
func (w *Watcher) Healthy() error {
	s := w.Status()
	if s.LastError == nil {
		return nil
	}
	return fmt.Errorf("policy: files invalid since %s, still serving version %s: %w",
		s.LastErrorAt.UTC().Format(time.RFC3339), s.Version, s.LastError)
}

// Reload loads the files now, as a change would, and returns the load error
// if they are invalid (the last good policy then stays in use).
func (w *Watcher) Reload() error { return w.reload() }

// Close stops watching. It is safe to call more than once.
func (w *Watcher) Close() error {
	var err error
	w.closeOnce.Do(func() {
		close(w.stop)
		<-w.done
		err = w.fsw.Close()
	})
	return err
}

func (w *Watcher) loop() {
	defer close(w.done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		select {
		case <-w.stop:
			return
		case ev, ok := <-w.fsw.Events:
			if !ok {
				return
			}
			w.logger.Debug("policy: file event", "event", ev.String())
			timer.Reset(w.cfg.Debounce)
		case err, ok := <-w.fsw.Errors:
			if !ok {
				return
			}
			w.logger.Warn("policy: watch error; reloading to be safe", "error", err)
			timer.Reset(w.cfg.Debounce)
		case <-timer.C:
			_ = w.reload()
		}
	}
}

func (w *Watcher) reload() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	old := w.cur.Load()
	p, err := Load(w.cfg.Paths, w.cfg.Load)
	if err != nil {
		w.status.LastError, w.status.LastErrorAt = err, time.Now()
		w.status.Failures++
		w.logger.Error("policy: reload rejected; keeping the last good policy",
			"version", old.Version(), "error", err.Error())
		if w.cfg.OnReload != nil {
			w.cfg.OnReload(nil, err)
		}
		return err
	}
	w.status.LastError, w.status.LastErrorAt = nil, time.Time{}
	if p.Version() == old.Version() {
		w.logger.Debug("policy: files changed, policy did not", "version", old.Version())
		return nil
	}
	w.cur.Store(p)
	w.status.Version, w.status.LoadedAt = p.Version(), time.Now()
	w.status.Reloads++
	w.logger.Info("policy: reloaded", "version", p.Version(), "previous", old.Version(),
		"files", len(p.files), "rules", len(p.rules))
	if w.cfg.OnReload != nil {
		w.cfg.OnReload(p, nil)
	}
	return nil
}
