package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	_ "github.com/go-sql-driver/mysql" // the "mysql" driver
	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver
	"github.com/spf13/cobra"
	_ "modernc.org/sqlite" // the "sqlite" driver

	"github.com/tailrace/tailrace/outbox"
)

func init() { addCommand(newOutboxCmd) }

// stdin is where purge reads its confirmation; tests replace it.
var stdin io.Reader = os.Stdin

// outboxFlags are the flags every outbox subcommand takes.
type outboxFlags struct {
	db      string
	table   string
	json    bool
	timeout time.Duration
}

func (f *outboxFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.db, "db", os.Getenv("TAILRACE_DB"),
		"database: postgres://… URL, PostgreSQL key=value DSN (host=… dbname=…), MySQL DSN (user:pass@tcp(host:3306)/db, or mysql://… the same), or SQLite file (path, file:…, sqlite:…); default $TAILRACE_DB")
	cmd.Flags().StringVar(&f.table, "table", outbox.DefaultTable, "outbox table")
	cmd.Flags().BoolVar(&f.json, "json", false, "print machine-readable JSON")
	cmd.Flags().DurationVar(&f.timeout, "timeout", 5*time.Minute, "give up after this long")
}

// open connects to the database and returns the Admin of the table.
func (f *outboxFlags) open(ctx context.Context) (*outbox.Admin, func(), error) {
	db, t, err := openDB(ctx, f.db)
	if err != nil {
		return nil, nil, err
	}
	a, err := outbox.NewAdmin(db, t.dialect, f.table)
	if err != nil {
		_ = db.Close()
		return nil, nil, err
	}
	return a, func() { _ = db.Close() }, nil
}

// openDB opens and pings the database of --db. Its errors name the form of
// the connection string, never its value (run scrubs passwords from
// whatever a driver says, too).
func openDB(ctx context.Context, s string) (*sql.DB, dbTarget, error) {
	if s == "" {
		return nil, dbTarget{}, errors.New("--db is required (or set TAILRACE_DB)")
	}
	t, err := parseDB(s)
	if err != nil {
		return nil, t, err
	}
	db, err := sql.Open(t.driver, t.dsn)
	if err != nil {
		return nil, t, &exitError{code: exitInvalid, err: fmt.Errorf("open the %s: %w", t.form, err)}
	}
	db.SetMaxOpenConns(2)
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, t, &exitError{code: exitInvalid, err: fmt.Errorf("connect with the %s: %w", t.form, err)}
	}
	return db, t, nil
}

func newOutboxCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "outbox",
		Short: "Inspect an outbox; list, replay and purge its dead letters",
		Long: `Operate on one outbox table (default tailrace_outbox) in a database given
with --db (or $TAILRACE_DB):

  postgres://user@host:5432/db?sslmode=disable         (PostgreSQL URL)
  'host=db.internal user=app password=… dbname=app'     (PostgreSQL key=value DSN)
  user:password@tcp(host:3306)/db        (MySQL/MariaDB; mysql://… also works)
  ./service.db, file:./service.db, sqlite:./service.db   (SQLite; must exist)

The form is told by its syntax, never by whether a file exists: a string
starting with key= is a key=value DSN, one with an @ a MySQL DSN; give a file
whose name looks like either as sqlite:PATH. No error or output repeats the
password.

Exit status: 0 success, 1 the operation failed or was not confirmed, 2 usage error.`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("unknown command %q for %q", args[0], cmd.CommandPath())
			}
			return fmt.Errorf("%s needs a subcommand: status, dead, replay or purge", cmd.CommandPath())
		},
	}
	cmd.AddCommand(newOutboxStatusCmd(e), newOutboxDeadCmd(e), newOutboxReplayCmd(e), newOutboxPurgeCmd(e))
	return cmd
}

func outboxTimeout(f *outboxFlags) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), f.timeout)
}

func outboxFail(err error) error {
	var ee *exitError
	if errors.As(err, &ee) || err == nil {
		return err
	}
	return &exitError{code: exitInvalid, err: err}
}

// ------------------------------------------------------------------ status

func newOutboxStatusCmd(e *env) *cobra.Command {
	var f outboxFlags
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Depth, lag, dead letters, relays and leases of an outbox",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := outboxTimeout(&f)
			defer cancel()
			a, done, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			st, err := a.Status(ctx)
			if err != nil {
				return outboxFail(err)
			}
			if f.json {
				return writeJSON(e, st)
			}
			printStatus(e.stdout, st)
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func printStatus(w io.Writer, st outbox.Status) {
	fmt.Fprintf(w, "outbox %s\n", st.Table)
	fmt.Fprintf(w, "  pending:        %d (%d retrying)\n", st.Pending, st.Retrying)
	if st.Pending > 0 {
		fmt.Fprintf(w, "  oldest pending: %s ago (staged %s)\n", st.OldestPendingAge.Round(time.Millisecond), st.OldestPendingAt.UTC().Format(time.RFC3339))
	} else {
		fmt.Fprintf(w, "  oldest pending: -\n")
	}
	if st.Relayed > 0 {
		fmt.Fprintf(w, "  relayed rows:   %d (kept for RelayConfig.Retention)\n", st.Relayed)
	}
	if st.DeadLetters > 0 {
		fmt.Fprintf(w, "  dead letters:   %d (latest %s); list them with `tailrace outbox dead`\n", st.DeadLetters, st.LastDeadAt.UTC().Format(time.RFC3339))
	} else {
		fmt.Fprintf(w, "  dead letters:   0\n")
	}
	fmt.Fprintf(w, "  relays:         %d live, %d registered\n", st.LiveRelays(), len(st.Relays))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, r := range st.Relays {
		state := "live, heartbeat expires in " + r.ExpiresAt.Sub(st.Now).Round(time.Millisecond).String()
		if !r.Live {
			state = "EXPIRED " + st.Now.Sub(r.ExpiresAt).Round(time.Second).String() + " ago"
		}
		held := 0
		for _, l := range st.Leases {
			if l.Owner == r.Owner && l.Live {
				held++
			}
		}
		fmt.Fprintf(tw, "    %s\t%s\tpartitions %d/%d\tstarted %s\n", r.Owner, state, held, r.Partitions, r.StartedAt.UTC().Format(time.RFC3339))
	}
	_ = tw.Flush()
	expired := len(st.Leases) - st.LiveLeases()
	fmt.Fprintf(w, "  leases:         %d live, %d expired\n", st.LiveLeases(), expired)
}

// -------------------------------------------------------------------- dead

// selectFlags select dead letters.
type selectFlags struct {
	kind          string
	since, before string
	all           bool
}

func (s *selectFlags) register(cmd *cobra.Command, beforeName, beforeHelp string) {
	cmd.Flags().StringVar(&s.kind, "kind", "", "only dead letters of this message kind")
	cmd.Flags().StringVar(&s.since, "since", "", "only dead letters that died since this time (RFC 3339) or this long ago (e.g. 24h)")
	if beforeName != "" {
		cmd.Flags().StringVar(&s.before, beforeName, "", beforeHelp)
	}
}

// filter builds the DeadFilter from the flags and the id arguments.
func (s *selectFlags) filter(args []string) (outbox.DeadFilter, error) {
	f := outbox.DeadFilter{Kind: s.kind, All: s.all}
	for _, a := range args {
		id, err := strconv.ParseInt(a, 10, 64)
		if err != nil || id <= 0 {
			return f, fmt.Errorf("dead letter id %q is not a positive integer", a)
		}
		f.IDs = append(f.IDs, id)
	}
	var err error
	if f.Since, err = parseWhen(s.since, "--since"); err != nil {
		return f, err
	}
	if f.Before, err = parseWhen(s.before, "--older-than"); err != nil {
		return f, err
	}
	return f, nil
}

// parseWhen reads a time: RFC 3339, or a duration meaning that long ago.
func parseWhen(v, flag string) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(v); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("%s %s: a duration must not be negative", flag, v)
		}
		return time.Now().Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		return time.Time{}, fmt.Errorf("%s %q: want a duration (24h) or an RFC 3339 time (2026-11-23T10:00:00Z)", flag, v)
	}
	return t, nil
}

// deadJSON is a dead letter in --json output.
type deadJSON struct {
	ID           int64             `json:"id"`
	MessageID    string            `json:"message_id"`
	UUID         string            `json:"uuid"`
	Kind         string            `json:"kind"`
	PartitionKey string            `json:"partition_key,omitempty"`
	Attempts     int               `json:"attempts"`
	LastError    string            `json:"last_error"`
	CreatedAt    time.Time         `json:"created_at"`
	DeadAt       time.Time         `json:"dead_at"`
	Destination  string            `json:"destination,omitempty"`
	PayloadBytes int               `json:"payload_bytes"`
	Metadata     map[string]string `json:"metadata,omitempty"`
}

func newOutboxDeadCmd(e *env) *cobra.Command {
	var f outboxFlags
	var sel selectFlags
	var limit int
	var after int64
	cmd := &cobra.Command{
		Use:   "dead [ID...]",
		Short: "List dead letters with their errors",
		Long: `List the dead letters of an outbox, oldest id first, with the error that
killed each one. Page with --after the last id shown.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			filter, err := sel.filter(args)
			if err != nil {
				return err
			}
			ctx, cancel := outboxTimeout(&f)
			defer cancel()
			a, done, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			total, err := a.CountDead(ctx, filter)
			if err != nil {
				return outboxFail(err)
			}
			letters, err := a.ListDead(ctx, filter, after, limit)
			if err != nil {
				return outboxFail(err)
			}
			if f.json {
				out := struct {
					Total   int        `json:"total"`
					Letters []deadJSON `json:"dead_letters"`
				}{Total: total, Letters: []deadJSON{}}
				for _, l := range letters {
					j := deadJSON{ID: l.ID, MessageID: l.MessageID, UUID: l.UUID, Kind: l.Kind, PartitionKey: l.PartitionKey,
						Attempts: l.Attempts, LastError: l.LastError, CreatedAt: l.CreatedAt, DeadAt: l.DeadAt}
					// The row's payload is the forwarder envelope: the
					// message as staged, with its destination and metadata.
					var env struct {
						Destination string            `json:"destination_topic"`
						Payload     []byte            `json:"payload"`
						Metadata    map[string]string `json:"metadata"`
					}
					if json.Unmarshal(l.Payload, &env) == nil {
						j.Destination, j.PayloadBytes, j.Metadata = env.Destination, len(env.Payload), env.Metadata
					} else {
						j.PayloadBytes = len(l.Payload)
					}
					out.Letters = append(out.Letters, j)
				}
				return writeJSON(e, out)
			}
			tw := tabwriter.NewWriter(e.stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tKIND\tATTEMPTS\tDEAD AT\tMESSAGE ID\tERROR")
			for _, l := range letters {
				msg := strings.Join(strings.Fields(l.LastError), " ")
				if len(msg) > 120 {
					msg = msg[:120] + "…"
				}
				fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%s\n", l.ID, l.Kind, l.Attempts, l.DeadAt.UTC().Format(time.RFC3339), l.MessageID, msg)
			}
			_ = tw.Flush()
			fmt.Fprintf(e.stdout, "%d of %d dead letter(s) shown\n", len(letters), total)
			return nil
		},
	}
	f.register(cmd)
	sel.register(cmd, "", "")
	cmd.Flags().IntVar(&limit, "limit", 50, "show at most this many")
	cmd.Flags().Int64Var(&after, "after", 0, "show ids above this one (paging)")
	return cmd
}

// ------------------------------------------------------------ replay, purge

// outboxProgress prints "verb done/total" on stderr after each batch when the
// operation takes more than one batch.
func outboxProgress(w io.Writer, verb string, batch int) func(done, total int) {
	return func(done, total int) {
		if total > batch {
			fmt.Fprintf(w, "%s %d/%d\n", verb, done, total)
		}
	}
}

func newOutboxReplayCmd(e *env) *cobra.Command {
	var f outboxFlags
	var sel selectFlags
	var batch int
	cmd := &cobra.Command{
		Use:   "replay [ID...] [--kind K] [--since T] [--all]",
		Short: "Move dead letters back into the outbox to be relayed again",
		Long: `Move the selected dead letters back into the outbox, where the relay sends
them again with their message ids (consumers' inboxes still deduplicate).
Select by id arguments, --kind, --since, or --all; several selectors combine
with AND. Replay is idempotent: a dead letter is moved back exactly once, even
by two replays running at the same time. Progress goes to stderr.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			filter, err := sel.filter(args)
			if err != nil {
				return err
			}
			if filter.Empty() {
				return errors.New("replay needs ids, --kind, --since or --all")
			}
			ctx, cancel := outboxTimeout(&f)
			defer cancel()
			a, done, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			n, err := a.Replay(ctx, filter, &outbox.BatchOptions{Size: batch, Progress: outboxProgress(e.stderr, "replayed", batch)})
			if err != nil {
				return outboxFail(fmt.Errorf("%w (%d replayed before the error)", err, n))
			}
			if f.json {
				return writeJSON(e, map[string]int{"replayed": n})
			}
			fmt.Fprintf(e.stdout, "replayed %d dead letter(s) into %s\n", n, a.Table())
			return nil
		},
	}
	f.register(cmd)
	sel.register(cmd, "", "")
	cmd.Flags().BoolVar(&sel.all, "all", false, "select every dead letter")
	cmd.Flags().IntVar(&batch, "batch", outbox.DefaultAdminBatch, "dead letters per transaction")
	return cmd
}

func newOutboxPurgeCmd(e *env) *cobra.Command {
	var f outboxFlags
	var sel selectFlags
	var batch int
	var yes bool
	cmd := &cobra.Command{
		Use:   "purge [ID...] [--older-than D] [--kind K] [--all] [--yes]",
		Short: "Delete dead letters for good",
		Long: `Delete the selected dead letters for good. Select by id arguments,
--older-than (died before that time, or that long ago), --kind, --since, or
--all; several selectors combine with AND. Without a selector nothing is
deleted. Asks for confirmation on stdin unless --yes. Progress goes to stderr.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			filter, err := sel.filter(args)
			if err != nil {
				return err
			}
			if filter.Empty() {
				return errors.New("purge needs ids, --older-than, --kind, --since or --all")
			}
			ctx, cancel := outboxTimeout(&f)
			defer cancel()
			a, done, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			if !yes {
				n, err := a.CountDead(ctx, filter)
				if err != nil {
					return outboxFail(err)
				}
				if n == 0 {
					if f.json {
						return writeJSON(e, map[string]int{"purged": 0})
					}
					fmt.Fprintln(e.stdout, "no dead letter matches; nothing to purge")
					return nil
				}
				fmt.Fprintf(e.stderr, "Delete %d dead letter(s) of %s for good? [y/N] ", n, a.Table())
				line, _ := bufio.NewReader(stdin).ReadString('\n')
				if a := strings.ToLower(strings.TrimSpace(line)); a != "y" && a != "yes" {
					return &exitError{code: exitInvalid, err: errors.New("purge not confirmed; nothing deleted")}
				}
			}
			n, err := a.Purge(ctx, filter, &outbox.BatchOptions{Size: batch, Progress: outboxProgress(e.stderr, "purged", batch)})
			if err != nil {
				return outboxFail(fmt.Errorf("%w (%d purged before the error)", err, n))
			}
			if f.json {
				return writeJSON(e, map[string]int{"purged": n})
			}
			fmt.Fprintf(e.stdout, "purged %d dead letter(s) from %s\n", n, a.Table())
			return nil
		},
	}
	f.register(cmd)
	sel.register(cmd, "older-than", "only dead letters that died before this time (RFC 3339) or more than this long ago (e.g. 720h)")
	cmd.Flags().BoolVar(&sel.all, "all", false, "select every dead letter")
	cmd.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation")
	cmd.Flags().IntVar(&batch, "batch", outbox.DefaultAdminBatch, "dead letters per transaction")
	return cmd
}
