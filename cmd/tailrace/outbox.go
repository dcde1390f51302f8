package main

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

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
	if msg := err.Error(); strings.Contains(msg, "42P01") || strings.Contains(msg, "Error 1146") || strings.Contains(msg, "no such table") {
		// A missing table: say how to look and fix.
		err = fmt.Errorf("%w\n(is the outbox schema there? `tailrace migrate status` tells; `tailrace migrate up` creates it)", err)
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
	groups        []string
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
	for _, g := range s.groups {
		if !outbox.IsGroupID(g) {
			return f, fmt.Errorf("--group %q is not a group id (g and 10 hex digits, as `tailrace outbox dead --group` lists them)", g)
		}
		f.Groups = append(f.Groups, g)
	}
	for _, a := range args {
		if outbox.IsGroupID(a) {
			f.Groups = append(f.Groups, a)
			continue
		}
		id, err := strconv.ParseInt(a, 10, 64)
		if err != nil || id <= 0 {
			return f, fmt.Errorf("dead letter id %q is not a positive integer (nor a group id)", a)
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
	var group bool
	cmd := &cobra.Command{
		Use:   "dead [ID|GROUP...] [--group]",
		Short: "List dead letters with their errors, or their failure groups",
		Long: `List the dead letters of an outbox, oldest id first, with the error that
killed each one. Page with --after the last id shown. Arguments select ids
and failure groups (g…); an id that is not a dead letter is named and makes
the exit status 1.

--group lists failure groups instead: the letters that share a kind, a
destination and an error once numbers, ids and UUIDs are masked, with their
count and when the first and last died, largest first. Replay or purge a
whole group with its id ('tailrace outbox replay g3fa2c1b0d9').

'tailrace outbox dead show ID' prints one letter with its headers and
payload.`,
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
			unknown, err := unknownSelected(ctx, a, filter)
			if err != nil {
				return outboxFail(err)
			}
			if group {
				if err := printGroups(ctx, e, a, filter, f.json); err != nil {
					return err
				}
				return withUnknown(unknown)
			}
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
				if err := writeJSON(e, out); err != nil {
					return err
				}
				return withUnknown(unknown)
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
			return withUnknown(unknown)
		},
	}
	f.register(cmd)
	sel.register(cmd, "", "")
	cmd.Flags().IntVar(&limit, "limit", 50, "show at most this many")
	cmd.Flags().Int64Var(&after, "after", 0, "show ids above this one (paging)")
	cmd.Flags().BoolVar(&group, "group", false, "list failure groups (kind, destination, normalized error) with counts instead of letters")
	cmd.AddCommand(newOutboxDeadShowCmd(e))
	return cmd
}

// printGroups prints the failure groups of the letters filter selects.
func printGroups(ctx context.Context, e *env, a *outbox.Admin, filter outbox.DeadFilter, asJSON bool) error {
	groups, err := a.DeadGroups(ctx, filter)
	if err != nil {
		return outboxFail(err)
	}
	if asJSON {
		return writeJSON(e, struct {
			Groups []outbox.DeadGroup `json:"groups"`
		}{groups})
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "GROUP\tCOUNT\tKIND\tDESTINATION\tFIRST DEAD\tLAST DEAD\tERROR")
	total := 0
	for _, g := range groups {
		msg := g.Error
		if len(msg) > 100 {
			msg = msg[:100] + "…"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\n", g.ID, g.Count, g.Kind, g.Destination,
			g.FirstDeadAt.UTC().Format(time.RFC3339), g.LastDeadAt.UTC().Format(time.RFC3339), msg)
		total += g.Count
	}
	_ = tw.Flush()
	fmt.Fprintf(e.stdout, "%d group(s), %d dead letter(s)\n", len(groups), total)
	return nil
}

// showJSON is one dead letter in `dead show --json`.
type showJSON struct {
	deadJSON
	Headers map[string]string `json:"headers"`
	// Payload is the payload as text when it is valid UTF-8, else
	// PayloadBase64 holds it; both are cut at --max-bytes (Truncated).
	Payload       string `json:"payload,omitempty"`
	PayloadBase64 string `json:"payload_base64,omitempty"`
	Truncated     bool   `json:"truncated,omitempty"`
}

func newOutboxDeadShowCmd(e *env) *cobra.Command {
	var f outboxFlags
	var maxBytes int
	cmd := &cobra.Command{
		Use:   "show ID",
		Short: "Print one dead letter: its error, headers and payload",
		Long: `Print one dead letter with the error that killed it, the headers (metadata)
it was staged with, its destination and its payload. The payload is printed
as text when it is UTF-8 (base64 otherwise) and cut at --max-bytes (default
64 KiB; 0 prints all of it). Exit status 1 when the id is not a dead letter.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := strconv.ParseInt(args[0], 10, 64)
			if err != nil || id <= 0 {
				return fmt.Errorf("dead letter id %q is not a positive integer", args[0])
			}
			if maxBytes < 0 {
				return fmt.Errorf("--max-bytes must not be negative")
			}
			ctx, cancel := outboxTimeout(&f)
			defer cancel()
			a, done, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			l, err := a.DeadLetter(ctx, id)
			if errors.Is(err, outbox.ErrDeadLetterNotFound) {
				return &exitError{code: exitInvalid, err: fmt.Errorf("no dead letter with id %d (never dead, or replayed or purged already)", id)}
			}
			if err != nil {
				return outboxFail(err)
			}
			j := showJSON{deadJSON: deadJSON{ID: l.ID, MessageID: l.MessageID, UUID: l.UUID, Kind: l.Kind, PartitionKey: l.PartitionKey,
				Attempts: l.Attempts, LastError: l.LastError, CreatedAt: l.CreatedAt, DeadAt: l.DeadAt}}
			payload := l.Payload
			env, envErr := l.Envelope()
			if envErr == nil {
				j.Destination, j.Headers, payload = env.Destination, env.Metadata, env.Payload
			}
			j.PayloadBytes = len(payload)
			shown := payload
			if maxBytes > 0 && len(shown) > maxBytes {
				shown, j.Truncated = shown[:maxBytes], true
				for !utf8.Valid(shown) && len(shown) > maxBytes-4 && len(shown) > 0 {
					shown = shown[:len(shown)-1] // do not cut a rune in two
				}
			}
			text := utf8.Valid(payload)
			if text {
				j.Payload = string(shown)
			} else {
				j.PayloadBase64 = base64.StdEncoding.EncodeToString(shown)
			}
			if f.json {
				return writeJSON(e, j)
			}
			w := e.stdout
			fmt.Fprintf(w, "dead letter %d of %s\n", l.ID, a.Table())
			fmt.Fprintf(w, "  kind:          %s\n", l.Kind)
			fmt.Fprintf(w, "  message id:    %s\n", l.MessageID)
			fmt.Fprintf(w, "  uuid:          %s\n", l.UUID)
			if l.PartitionKey != "" {
				fmt.Fprintf(w, "  partition key: %s\n", l.PartitionKey)
			}
			fmt.Fprintf(w, "  destination:   %s\n", j.Destination)
			fmt.Fprintf(w, "  group:         %s\n", l.Group())
			fmt.Fprintf(w, "  attempts:      %d\n", l.Attempts)
			fmt.Fprintf(w, "  staged:        %s\n", l.CreatedAt.UTC().Format(time.RFC3339Nano))
			fmt.Fprintf(w, "  dead:          %s\n", l.DeadAt.UTC().Format(time.RFC3339Nano))
			fmt.Fprintf(w, "  error:         %s\n", l.LastError)
			if envErr != nil {
				fmt.Fprintf(w, "  (the row is not a forwarder envelope; the payload below is the raw row)\n")
			}
			fmt.Fprintf(w, "headers:\n")
			keys := slices.Sorted(maps.Keys(j.Headers))
			for _, k := range keys {
				fmt.Fprintf(w, "  %s: %s\n", k, j.Headers[k])
			}
			enc := "text"
			if !text {
				enc = "base64"
			}
			fmt.Fprintf(w, "payload (%d bytes, %s):\n", len(payload), enc)
			if text {
				fmt.Fprintln(w, j.Payload)
			} else {
				fmt.Fprintln(w, j.PayloadBase64)
			}
			if j.Truncated {
				fmt.Fprintf(w, "… %d more byte(s) not shown (--max-bytes 0 shows all)\n", len(payload)-len(shown))
			}
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().IntVar(&maxBytes, "max-bytes", 64<<10, "print at most this many payload bytes (0: all)")
	return cmd
}

// ------------------------------------------------------------ replay, purge

// unknownSelected returns, as unknown, an error naming the ids of f that
// are not dead letters and the groups of f that have none (nil when all are
// known); err is a failure to look them up.
func unknownSelected(ctx context.Context, a *outbox.Admin, f outbox.DeadFilter) (unknown, err error) {
	var parts []string
	if len(f.IDs) > 0 {
		missing, err := a.MissingDead(ctx, f.IDs)
		if err != nil {
			return nil, err
		}
		if len(missing) > 0 {
			ids := make([]string, len(missing))
			for i, id := range missing {
				ids[i] = strconv.FormatInt(id, 10)
			}
			parts = append(parts, "no dead letter with id "+strings.Join(ids, ", ")+" (never dead, or replayed or purged already)")
		}
	}
	for _, g := range f.Groups {
		n, err := a.CountDead(ctx, outbox.DeadFilter{Groups: []string{g}})
		if err != nil {
			return nil, err
		}
		if n == 0 {
			parts = append(parts, "no dead letter in group "+g)
		}
	}
	if len(parts) == 0 {
		return nil, nil
	}
	return errors.New(strings.Join(parts, "; ")), nil
}

// withUnknown ends a replay or purge: exit 1 naming the unknown ids and
// groups, after the known ones were handled.
func withUnknown(unknown error) error {
	if unknown == nil {
		return nil
	}
	return &exitError{code: exitInvalid, err: unknown}
}

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
		Use:   "replay [ID|GROUP...] [--group G] [--kind K] [--since T] [--all]",
		Short: "Move dead letters back into the outbox to be relayed again",
		Long: `Move the selected dead letters back into the outbox, where the relay sends
them again with their message ids (consumers' inboxes still deduplicate).
Select by id arguments, failure groups (g… arguments or --group, as
'tailrace outbox dead --group' lists them), --kind, --since, or --all;
ids and groups add up, the other selectors combine with them with AND. Replay is idempotent: a dead letter is
moved back exactly once, even by two replays running at the same time.
An id that is not a dead letter (or a group without one) is named and makes
the exit status 1, after the others were replayed. Progress goes to stderr.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			filter, err := sel.filter(args)
			if err != nil {
				return err
			}
			if filter.Empty() {
				return errors.New("replay needs ids, groups, --kind, --since or --all")
			}
			ctx, cancel := outboxTimeout(&f)
			defer cancel()
			a, done, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			unknown, err := unknownSelected(ctx, a, filter)
			if err != nil {
				return outboxFail(err)
			}
			n, err := a.Replay(ctx, filter, &outbox.BatchOptions{Size: batch, Progress: outboxProgress(e.stderr, "replayed", batch)})
			if err != nil {
				return outboxFail(fmt.Errorf("%w (%d replayed before the error)", err, n))
			}
			if f.json {
				if err := writeJSON(e, map[string]int{"replayed": n}); err != nil {
					return err
				}
				return withUnknown(unknown)
			}
			fmt.Fprintf(e.stdout, "replayed %d dead letter(s) into %s\n", n, a.Table())
			return withUnknown(unknown)
		},
	}
	f.register(cmd)
	sel.register(cmd, "", "")
	cmd.Flags().BoolVar(&sel.all, "all", false, "select every dead letter")
	cmd.Flags().StringSliceVar(&sel.groups, "group", nil, "only dead letters of this failure group (repeatable; see dead --group)")
	cmd.Flags().IntVar(&batch, "batch", outbox.DefaultAdminBatch, "dead letters per transaction")
	return cmd
}

func newOutboxPurgeCmd(e *env) *cobra.Command {
	var f outboxFlags
	var sel selectFlags
	var batch int
	var yes bool
	cmd := &cobra.Command{
		Use:   "purge [ID|GROUP...] [--group G] [--older-than D] [--kind K] [--all] [--yes]",
		Short: "Delete dead letters for good",
		Long: `Delete the selected dead letters for good. Select by id arguments, failure
groups (g… arguments or --group), --older-than (died before that time, or
that long ago), --kind, --since, or --all; ids and groups add up, the other
selectors combine with them with AND. Without a selector nothing is deleted. Asks for confirmation on stdin
unless --yes. An id that is not a dead letter (or a group without one) is
named and makes the exit status 1. Progress goes to stderr.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			filter, err := sel.filter(args)
			if err != nil {
				return err
			}
			if filter.Empty() {
				return errors.New("purge needs ids, groups, --older-than, --kind, --since or --all")
			}
			ctx, cancel := outboxTimeout(&f)
			defer cancel()
			a, done, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer done()
			unknown, err := unknownSelected(ctx, a, filter)
			if err != nil {
				return outboxFail(err)
			}
			if !yes {
				n, err := a.CountDead(ctx, filter)
				if err != nil {
					return outboxFail(err)
				}
				if n == 0 {
					if f.json {
						if err := writeJSON(e, map[string]int{"purged": 0}); err != nil {
							return err
						}
						return withUnknown(unknown)
					}
					fmt.Fprintln(e.stdout, "no dead letter matches; nothing to purge")
					return withUnknown(unknown)
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
				if err := writeJSON(e, map[string]int{"purged": n}); err != nil {
					return err
				}
				return withUnknown(unknown)
			}
			fmt.Fprintf(e.stdout, "purged %d dead letter(s) from %s\n", n, a.Table())
			return withUnknown(unknown)
		},
	}
	f.register(cmd)
	sel.register(cmd, "older-than", "only dead letters that died before this time (RFC 3339) or more than this long ago (e.g. 720h)")
	cmd.Flags().BoolVar(&sel.all, "all", false, "select every dead letter")
	cmd.Flags().StringSliceVar(&sel.groups, "group", nil, "only dead letters of this failure group (repeatable; see dead --group)")
	cmd.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation")
	cmd.Flags().IntVar(&batch, "batch", outbox.DefaultAdminBatch, "dead letters per transaction")
	return cmd
}
