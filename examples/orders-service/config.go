package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"time"
)

// The roles one binary can play. A deployment runs them together (the
// default) or in separate processes on the same database and broker.
const (
	RoleAPI      = "api"      // the HTTP API: commands and queries
	RoleRelay    = "relay"    // drains the outbox to RabbitMQ
	RoleConsumer = "consumer" // consumes the order events
)

// Config is the service's configuration, from flags and the environment.
type Config struct {
	// Addr is where the HTTP API (and /healthz) listens. Default ":8080".
	Addr string
	// PostgresURL is the service's database. Default $TAILRACE_POSTGRES_URL,
	// else the local PostgreSQL.
	PostgresURL string
	// AMQPURL is the RabbitMQ broker. Default $TAILRACE_AMQP_URL, else the
	// local RabbitMQ.
	AMQPURL string
	// AMQPPrefix prefixes every RabbitMQ exchange and queue name. Default "".
	AMQPPrefix string
	// NATSURL is the NATS JetStream server. Default $TAILRACE_NATS_URL, else
	// the local NATS.
	NATSURL string
	// NATSPrefix prefixes every NATS subject (and so stream) name. Default "".
	NATSPrefix string
	// PolicyPaths are the routing policy files, watched and reloaded on
	// change. Default: policy.json next to this file.
	PolicyPaths []string
	// Roles are the roles this process plays. Default all three.
	Roles []string
	// ShutdownTimeout bounds the graceful shutdown. Default 20 s.
	ShutdownTimeout time.Duration
	// RelayPollInterval is the relay's fallback poll. Default 1 s (commits
	// wake it at once: in-process, and through PostgreSQL LISTEN/NOTIFY from
	// other processes).
	RelayPollInterval time.Duration
	// LogLevel is the slog level. Default info.
	LogLevel string
}

// Defaults of Config.
const (
	defaultAddr        = ":8080"
	defaultPostgresURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	defaultAMQPURL     = "amqp://guest:guest@127.0.0.1:5672/"
	defaultNATSURL     = "nats://127.0.0.1:4222"
	defaultPolicy      = "examples/orders-service/policy.json"
)

var allRoles = []string{RoleAPI, RoleRelay, RoleConsumer}

func (c *Config) setDefaults() {
	if c.Addr == "" {
		c.Addr = defaultAddr
	}
	if c.PostgresURL == "" {
		c.PostgresURL = envOr("TAILRACE_POSTGRES_URL", defaultPostgresURL)
	}
	if c.AMQPURL == "" {
		c.AMQPURL = envOr("TAILRACE_AMQP_URL", defaultAMQPURL)
	}
	if c.NATSURL == "" {
		c.NATSURL = envOr("TAILRACE_NATS_URL", defaultNATSURL)
	}
	if len(c.PolicyPaths) == 0 {
		c.PolicyPaths = []string{defaultPolicy}
	}
	if len(c.Roles) == 0 {
		c.Roles = allRoles
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 20 * time.Second
	}
	if c.RelayPollInterval == 0 {
		c.RelayPollInterval = time.Second
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
}

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	for _, r := range c.Roles {
		if !slices.Contains(allRoles, r) {
			errs = append(errs, fmt.Errorf("unknown role %q (want %s)", r, strings.Join(allRoles, ", ")))
		}
	}
	if c.ShutdownTimeout <= 0 {
		errs = append(errs, fmt.Errorf("shutdown timeout must be positive, got %v", c.ShutdownTimeout))
	}
	if c.RelayPollInterval <= 0 {
		errs = append(errs, fmt.Errorf("relay poll interval must be positive, got %v", c.RelayPollInterval))
	}
	if _, err := c.level(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// level parses LogLevel.
func (c Config) level() (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return 0, fmt.Errorf("log level: %w", err)
	}
	return l, nil
}

// Has reports whether the process plays role.
func (c Config) Has(role string) bool { return slices.Contains(c.Roles, role) }

// parseConfig reads the flags; unset values take their defaults.
func parseConfig(args []string) (Config, error) {
	var c Config
	var roles, policies string
	fs := flag.NewFlagSet("orders-service", flag.ContinueOnError)
	fs.StringVar(&c.Addr, "addr", defaultAddr, "HTTP listen address")
	fs.StringVar(&c.PostgresURL, "postgres", "", "PostgreSQL URL (default $TAILRACE_POSTGRES_URL, else "+defaultPostgresURL+")")
	fs.StringVar(&c.AMQPURL, "amqp", "", "RabbitMQ URL (default $TAILRACE_AMQP_URL, else the local RabbitMQ)")
	fs.StringVar(&c.AMQPPrefix, "amqp-prefix", "", "prefix of the RabbitMQ exchange and queue names")
	fs.StringVar(&c.NATSURL, "nats", "", "NATS URL (default $TAILRACE_NATS_URL, else the local NATS)")
	fs.StringVar(&c.NATSPrefix, "nats-prefix", "", "prefix of the NATS subjects")
	fs.StringVar(&policies, "policy", defaultPolicy, "routing policy files or directories, comma-separated (reloaded on change)")
	fs.StringVar(&roles, "roles", strings.Join(allRoles, ","), "roles to run, comma-separated: api, relay, consumer")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", 20*time.Second, "graceful shutdown bound")
	fs.StringVar(&c.LogLevel, "log-level", "info", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	c.PolicyPaths = splitList(policies)
	c.Roles = splitList(roles)
	c.setDefaults()
	return c, c.Validate()
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
