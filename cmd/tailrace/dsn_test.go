package main

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
)

func TestParseDBForms(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "svc.db")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	odd := filepath.Join(dir, "a=b@c.db")
	if err := os.WriteFile(odd, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		in, form string
	}{
		{"postgres://u:pw@127.0.0.1:5432/d?sslmode=disable", "postgres URL"},
		{"postgresql://u@h/d", "postgres URL"},
		{"host=127.0.0.1 user=u password=S dbname=d", "postgres key=value DSN"},
		{"  dbname=d host = h password='a b\\'c@d'", "postgres key=value DSN"},
		{"user=u password=p@ss dbname=d", "postgres key=value DSN"}, // an @ in a key=value password
		{"u:p@tcp(127.0.0.1:3306)/d", "mysql DSN"},
		{"u@unix(/run/mysqld.sock)/d", "mysql DSN"},
		{"u:p@/d", "mysql DSN"},
		{"tcp(127.0.0.1:3306)/d", "mysql DSN"},
		{"mysql://u:p@tcp(h:3306)/d", "mysql DSN"},
		{file, "sqlite file"},
		{"file:" + file + "?_pragma=foreign_keys(1)", "sqlite file"},
		{"sqlite:" + file, "sqlite file"},
		{"sqlite://" + file, "sqlite file"},
		{"sqlite:" + odd, "sqlite file"}, // a path that looks like a DSN, made explicit
	}
	for _, c := range cases {
		got, err := parseDB(c.in)
		if err != nil || got.form != c.form {
			t.Errorf("parseDB(%q) = %q, %v; want %q", c.in, got.form, err, c.form)
		}
	}
	// A key=value DSN is never taken for a file, whether or not one exists.
	t.Chdir(dir)
	if err := os.WriteFile("host=x", nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if got, err := parseDB("host=x"); err != nil || got.form != "postgres key=value DSN" {
		t.Errorf("parseDB(host=x) with a file of that name = %q, %v", got.form, err)
	}
	if got, err := parseDB("file:host=x"); err != nil || got.form != "sqlite file" {
		t.Errorf("parseDB(file:host=x) = %q, %v", got.form, err)
	}
}

func TestDBSecrets(t *testing.T) {
	cases := []struct{ in, want string }{
		{"postgres://u:MARK1@h/d", "MARK1"},
		{"postgres://u:MA%25RK@h/d", "MA%RK"},
		{"postgres://u@h/d?password=MARK2&sslmode=disable", "MARK2"},
		{"host=h password=MARK3 dbname=d", "MARK3"},
		{"host=h password='MA RK\\'4' dbname=d", "MA RK'4"},
		{"host=h password='MARK5", "MARK5"}, // unterminated quote
		{"host=h sslpassword=MARK6", "MARK6"},
		{"u:MARK7@tcp(h:3306)/d", "MARK7"},
		{"mysql://u:MARK8@tcp(h:3306)/d", "MARK8"},
	}
	for _, c := range cases {
		if got := dbSecrets(c.in); !containsStr(got, c.want) {
			t.Errorf("dbSecrets(%q) = %q; want it to hold %q", c.in, got, c.want)
		}
	}
	sc := scrubber{secrets: []string{"p"}}
	if got := sc.String("user=p password=p x:p@h"); got != "user=p password=*** x:***@h" {
		t.Errorf("short password scrub: %q", got)
	}
}

func containsStr(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// TestCLINoSecretInOutput runs every outbox subcommand with connection strings
// that carry a marker password and cannot work — malformed, unreachable, or
// refused by a live server — through --db and through $TAILRACE_DB, in text
// and --json, and checks that no output contains the marker. The servers
// need not run: a refused connection is one of the cases.
func TestCLINoSecretInOutput(t *testing.T) {
	const mark = "Zq7MARKER9x"
	dsns := []string{
		// PostgreSQL URL: unreachable, bad escape, password in the query,
		// bad port, unknown parameter value.
		"postgres://u:" + mark + "@127.0.0.1:1/d?sslmode=disable&connect_timeout=2",
		"postgres://u:" + mark + "%zz@127.0.0.1:1/d",
		"postgres://u:%" + mark + "@127.0.0.1:1/d",
		"postgresql://u@127.0.0.1:1/d?password=" + mark + "&connect_timeout=2",
		"postgres://u:" + mark + "@127.0.0.1:notaport/d",
		"postgres://u:" + mark + "@127.0.0.1:1/d?sslmode=bogus",
		// PostgreSQL key=value: the example, unreachable, quoted,
		// unterminated, bad port, refused by the live server.
		"host=127.0.0.1 user=u password=" + mark + " dbname=d connect_timeout=2",
		"host=127.0.0.1 port=1 user=u password=" + mark + " dbname=d",
		"host=127.0.0.1 port=1 password='" + mark + " with space' dbname=d",
		"host=127.0.0.1 port=1 password='" + mark,
		"host=127.0.0.1 port=abc password=" + mark,
		"password=" + mark + " host=127.0.0.1 port=5432 user=tailrace_no_such_role dbname=test sslmode=disable connect_timeout=2",
		"host=127.0.0.1 port=1 password" + mark,
		// MySQL: unreachable, mysql:// form, malformed, refused.
		"u:" + mark + "@tcp(127.0.0.1:1)/d?timeout=2s",
		"mysql://u:" + mark + "@tcp(127.0.0.1:1)/d?timeout=2s",
		"u:" + mark + "@tcp(127.0.0.1:1/d",
		"u:" + mark + "@tcp(127.0.0.1:1)/d?bogus=%",
		"u:" + mark + "@127.0.0.1:3306/d",
		"tailrace_no_such_user:" + mark + "@tcp(127.0.0.1:3306)/test?timeout=2s",
		// Other schemes and near misses.
		"redis://u:" + mark + "@127.0.0.1:1/0",
		"postgres:/u:" + mark + "@h/d",
		"u:" + mark + "@",
	}
	subs := [][]string{
		{"outbox", "status"},
		{"outbox", "status", "--json"},
		{"outbox", "dead"},
		{"outbox", "dead", "--json"},
		{"outbox", "replay", "--all"},
		{"outbox", "purge", "--all", "--yes"},
	}
	for _, dsn := range dsns {
		for _, sub := range subs {
			for _, viaEnv := range []bool{false, true} {
				args := append([]string(nil), sub...)
				if viaEnv {
					t.Setenv("TAILRACE_DB", dsn)
				} else {
					t.Setenv("TAILRACE_DB", "")
					args = append(args, "--db", dsn)
				}
				args = append(args, "--timeout", "10s")
				code, out, errs := runOutbox(t, "", args...)
				if code == 0 {
					t.Errorf("%q %v (env %v): exit 0", dsn, sub, viaEnv)
				}
				if strings.Contains(out+errs, "MARKER") {
					t.Errorf("%q %v (env %v): the password is printed:\n%s%s", dsn, sub, viaEnv, out, errs)
				}
			}
		}
	}
}

// TestCLIKeyValueDSN runs the outbox commands against PostgreSQL given as a
// key=value DSN, by flag and by $TAILRACE_DB.
func TestCLIKeyValueDSN(t *testing.T) {
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	table := testenv.UniqueName("kv")
	if err := outbox.InitializeSchema(ctx, pg.DB, outbox.PostgreSQL, table); err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(pg.URL)
	if err != nil {
		t.Fatal(err)
	}
	kv := "host=" + u.Hostname() + " port=" + u.Port() + " user=" + u.User.Username() + " dbname=" + strings.TrimPrefix(u.Path, "/") +
		" sslmode=disable search_path=" + pg.Schema
	if pw, ok := u.User.Password(); ok {
		kv += " password='" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(pw) + "'"
	}
	t.Setenv("TAILRACE_DB", "")
	if code, out, errs := runOutbox(t, "", "outbox", "status", "--db", kv, "--table", table); code != 0 || !strings.Contains(out, "outbox "+table) {
		t.Fatalf("status --db key=value: exit %d\n%s%s", code, out, errs)
	}
	t.Setenv("TAILRACE_DB", kv)
	if code, out, errs := runOutbox(t, "", "outbox", "dead", "--table", table); code != 0 || !strings.Contains(out, "0 of 0 dead letter(s) shown") {
		t.Fatalf("dead with $TAILRACE_DB key=value: exit %d\n%s%s", code, out, errs)
	}
}

// TestPoisonNoSecretInOutput is TestCLINoSecretInOutput for --broker and
// $TAILRACE_BROKER.
func TestPoisonNoSecretInOutput(t *testing.T) {
	const mark = "Zq7MARKER9x"
	for _, broker := range []string{
		"amqp://u:" + mark + "@127.0.0.1:1/",
		"amqp://u:" + mark + "%zz@127.0.0.1:1/",
		"amqp:/u:" + mark + "@127.0.0.1:1/",
		"nats://u:" + mark + "@127.0.0.1:1",
		"nats://u:" + mark + "%zz@127.0.0.1:1",
		"redis://u:" + mark + "@127.0.0.1:1",
	} {
		for _, sub := range [][]string{{"poison", "list"}, {"poison", "list", "--json"}, {"poison", "replay", "--all"}} {
			for _, viaEnv := range []bool{false, true} {
				args := append([]string(nil), sub...)
				if viaEnv {
					t.Setenv("TAILRACE_BROKER", broker)
				} else {
					t.Setenv("TAILRACE_BROKER", "")
					args = append(args, "--broker", broker)
				}
				code, out, errs := runOutbox(t, "", append(args, "--timeout", "10s")...)
				if code == 0 || strings.Contains(out+errs, "MARKER") {
					t.Errorf("%v (env %v): exit %d\n%s%s", sub, viaEnv, code, out, errs)
				}
			}
		}
	}
}
