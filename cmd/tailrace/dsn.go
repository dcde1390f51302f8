package main

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"

	"github.com/go-sql-driver/mysql"

	"github.com/tailrace/tailrace/outbox"
)

// dbTarget is a database connection string the CLI was given, classified.
type dbTarget struct {
	// form is "postgres URL", "postgres key=value DSN", "mysql DSN" or
	// "sqlite file".
	form    string
	driver  string // database/sql driver name
	dsn     string // what sql.Open gets
	dialect outbox.Dialect
}

// The forms of --db, told apart by syntax alone, never by whether a file of
// that name exists:
//
//   - postgres:// or postgresql://          PostgreSQL URL
//   - key=value ... (host=… user=… dbname=…)  PostgreSQL key=value DSN (libpq)
//   - mysql://…, or anything with an "@", or starting with tcp( or unix(:
//     a go-sql-driver/mysql DSN (user:password@tcp(host:3306)/db)
//   - sqlite:…, sqlite://…, file:… or any other plain path: an SQLite file
//     (which must exist: an admin command never creates a database)
//   - any other scheme:// is an error.
//
// A path that happens to look like one of the first three (a file named
// "a=b.db", or with an "@") is given as sqlite:PATH or file:PATH.
var (
	kvStart   = regexp.MustCompile(`^\s*[A-Za-z_][A-Za-z0-9_]*\s*=`)
	schemeRe  = regexp.MustCompile(`^([A-Za-z][A-Za-z0-9+.-]*)://`)
	mysqlProt = regexp.MustCompile(`^(tcp|unix)\(`)
)

// parseDB classifies s and returns how to open it. Its errors never contain
// s or any part of the password: they name the form and what is wrong.
func parseDB(s string) (dbTarget, error) {
	if strings.TrimSpace(s) == "" {
		return dbTarget{}, errors.New("--db is empty")
	}
	lower := strings.ToLower(s)
	switch {
	case strings.HasPrefix(lower, "postgres://"), strings.HasPrefix(lower, "postgresql://"):
		if _, err := url.Parse(s); err != nil {
			// net/url quotes the whole URL in its errors: say what, not where.
			return dbTarget{}, errors.New("--db: the PostgreSQL URL does not parse (a password with special characters must be %-escaped: % as %25, @ as %40, / as %2F)")
		}
		return dbTarget{form: "postgres URL", driver: "pgx", dsn: s, dialect: outbox.PostgreSQL}, nil
	case strings.HasPrefix(lower, "sqlite:"), strings.HasPrefix(lower, "file:"):
		return sqliteTarget(s)
	case strings.HasPrefix(lower, "mysql://"):
		return mysqlTarget(s)
	case schemeRe.MatchString(s):
		return dbTarget{}, fmt.Errorf("--db: unknown database URL scheme %q; want postgres://, mysql://, a key=value PostgreSQL DSN or an SQLite file", strings.ToLower(schemeRe.FindStringSubmatch(s)[1]))
	case kvStart.MatchString(s):
		// Before the @ test: a key=value password may hold an @.
		if _, err := parseKV(s); err != nil {
			return dbTarget{}, fmt.Errorf("--db: the PostgreSQL key=value DSN does not parse: %w", err)
		}
		return dbTarget{form: "postgres key=value DSN", driver: "pgx", dsn: s, dialect: outbox.PostgreSQL}, nil
	case strings.Contains(s, "@"), mysqlProt.MatchString(s):
		return mysqlTarget(s)
	}
	if strings.Contains(s, "://") {
		return dbTarget{}, errors.New("--db: unknown database URL scheme; want postgres://, mysql://, a key=value PostgreSQL DSN or an SQLite file")
	}
	return sqliteTarget(s)
}

func mysqlTarget(s string) (dbTarget, error) {
	raw := s
	if strings.HasPrefix(strings.ToLower(raw), "mysql://") {
		raw = raw[len("mysql://"):]
	}
	cfg, err := mysql.ParseDSN(raw)
	if err != nil {
		return dbTarget{}, errors.New("--db looks like a MySQL DSN (it has an @) but does not parse; want user:password@tcp(host:3306)/database, or sqlite:PATH for a file whose name has an @")
	}
	cfg.ParseTime = true
	return dbTarget{form: "mysql DSN", driver: "mysql", dsn: cfg.FormatDSN(), dialect: outbox.MySQL}, nil
}

func sqliteTarget(s string) (dbTarget, error) {
	path := s
	for _, p := range []string{"sqlite://", "sqlite:"} {
		if strings.HasPrefix(strings.ToLower(path), p) {
			path = path[len(p):]
			break
		}
	}
	file := path
	if strings.HasPrefix(strings.ToLower(file), "file:") {
		file = file[len("file:"):]
	}
	if i := strings.IndexByte(file, '?'); i >= 0 {
		file = file[:i]
	}
	if file == "" {
		return dbTarget{}, errors.New("--db: the SQLite file name is empty")
	}
	// sql.Open would create a missing file: an admin command must not.
	// The name is a path the user typed, not a credential: it is shown.
	if _, err := os.Stat(file); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return dbTarget{}, fmt.Errorf("--db: SQLite file %s does not exist (a PostgreSQL DSN is postgres://… or host=… dbname=…, a MySQL one user:password@tcp(host:3306)/db)", file)
		}
		return dbTarget{}, fmt.Errorf("--db: SQLite file %s: %w", file, err)
	}
	if !strings.HasPrefix(strings.ToLower(path), "file:") {
		path = "file:" + path
	}
	if !strings.Contains(path, "busy_timeout") {
		sep := "?"
		if strings.Contains(path, "?") {
			sep = "&"
		}
		path += sep + "_pragma=busy_timeout(5000)"
	}
	return dbTarget{form: "sqlite file", driver: "sqlite", dsn: path, dialect: outbox.SQLite}, nil
}

// parseKV parses a libpq key=value connection string: key = value pairs
// separated by spaces, values optionally in single quotes with \' and \\
// escapes. Its errors never quote a value.
func parseKV(s string) (map[string]string, error) {
	out := map[string]string{}
	i := 0
	skip := func() {
		for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') {
			i++
		}
	}
	for {
		skip()
		if i >= len(s) {
			return out, nil
		}
		start := i
		for i < len(s) && s[i] != '=' && s[i] != ' ' && s[i] != '\t' {
			i++
		}
		key := s[start:i]
		skip()
		if i >= len(s) || s[i] != '=' {
			return nil, fmt.Errorf("the setting %q has no =value", safeKey(key))
		}
		i++ // '='
		skip()
		var b strings.Builder
		if i < len(s) && s[i] == '\'' {
			i++
			closed := false
			for i < len(s) {
				c := s[i]
				if c == '\\' && i+1 < len(s) {
					b.WriteByte(s[i+1])
					i += 2
					continue
				}
				if c == '\'' {
					closed = true
					i++
					break
				}
				b.WriteByte(c)
				i++
			}
			if !closed {
				return nil, fmt.Errorf("the value of %q has no closing quote", safeKey(key))
			}
		} else {
			for i < len(s) && s[i] != ' ' && s[i] != '\t' && s[i] != '\n' && s[i] != '\r' {
				if s[i] == '\\' && i+1 < len(s) {
					i++
				}
				b.WriteByte(s[i])
				i++
			}
		}
		out[key] = b.String()
	}
}

// safeKey returns key if it looks like a setting name, else a placeholder:
// in a mangled string the "key" may be part of a password.
func safeKey(key string) string {
	if regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,40}$`).MatchString(key) && !strings.Contains(strings.ToLower(key), "pass") {
		return key
	}
	return "(a setting)"
}

// dbSecrets returns the passwords s may carry, in every spelling a library
// might echo (raw and %-unescaped): the user-info password of a URL or a
// MySQL DSN, and password=/sslpassword= settings of a URL query or a
// key=value DSN.
func dbSecrets(s string) []string {
	if s == "" {
		return nil
	}
	var out []string
	add := func(v string) {
		if v == "" {
			return
		}
		out = append(out, v)
		if u, err := url.PathUnescape(v); err == nil && u != v {
			out = append(out, u)
		}
		if u, err := url.QueryUnescape(v); err == nil && u != v {
			out = append(out, u)
		}
	}
	// key=value settings, parsed leniently (a malformed string still has
	// its password=... found).
	for _, re := range []*regexp.Regexp{
		regexp.MustCompile(`(?i)(?:^|[\s&?])(?:ssl)?password\s*=\s*'((?:[^'\\]|\\.)*)'?`),
		regexp.MustCompile(`(?i)(?:^|[\s&?])(?:ssl)?password\s*=\s*([^\s&']+)`),
	} {
		for _, m := range re.FindAllStringSubmatch(s, -1) {
			add(m[1])
			add(strings.NewReplacer(`\'`, `'`, `\\`, `\`).Replace(m[1]))
		}
	}
	if kv, err := parseKV(s); err == nil {
		add(kv["password"])
		add(kv["sslpassword"])
	}
	// user:password@ of a URL or a MySQL DSN: after any scheme, up to the
	// last @ before the host; the password starts at the first colon.
	rest := s
	if i := strings.Index(rest, "://"); i >= 0 {
		rest = rest[i+3:]
	}
	if at := strings.LastIndex(rest, "@"); at >= 0 {
		if _, pw, ok := strings.Cut(rest[:at], ":"); ok {
			add(pw)
		}
	}
	return out
}

// scrubber removes passwords from text before the CLI prints it.
type scrubber struct{ secrets []string }

// newScrubber collects the passwords of every connection string the
// command line or the environment hands the CLI (--db, --broker,
// $TAILRACE_DB, $TAILRACE_BROKER).
func newScrubber(args []string) scrubber {
	var sc scrubber
	vals := []string{os.Getenv("TAILRACE_DB"), os.Getenv("TAILRACE_BROKER")}
	for i, a := range args {
		for _, flag := range []string{"--db", "--broker"} {
			switch {
			case a == flag && i+1 < len(args):
				vals = append(vals, args[i+1])
			case strings.HasPrefix(a, flag+"="):
				vals = append(vals, a[len(flag+"="):])
			}
		}
	}
	for _, v := range vals {
		sc.secrets = append(sc.secrets, dbSecrets(v)...)
	}
	return sc
}

// String replaces every known password in text by ***. Longer secrets go
// first so a password containing another is masked whole.
func (sc scrubber) String(text string) string {
	secs := append([]string(nil), sc.secrets...)
	// Longest first.
	for i := 1; i < len(secs); i++ {
		for j := i; j > 0 && len(secs[j]) > len(secs[j-1]); j-- {
			secs[j], secs[j-1] = secs[j-1], secs[j]
		}
	}
	for _, s := range secs {
		if s == "" {
			continue
		}
		if len(s) >= 3 {
			text = strings.ReplaceAll(text, s, "***")
			continue
		}
		// A one- or two-character password is masked where it appears as
		// a password, not everywhere (that would mangle the message).
		for _, p := range [][2]string{{"password=", ""}, {"password='", "'"}, {":", "@"}} {
			text = strings.ReplaceAll(text, p[0]+s+p[1], p[0]+"***"+p[1])
		}
	}
	return text
}
