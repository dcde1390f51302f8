// Command tailrace is the command-line tool of the tailrace framework.
//
//	tailrace policy lint FILE|DIR...
//	tailrace policy explain FILE|DIR... --event NAME [--domain D] [--tenant-tier T] [--attr k=v]... [--json]
//	tailrace outbox status|dead|replay|purge --db DSN ...
//	tailrace poison list|replay --broker URL ...
//	tailrace migrate up|status|validate --db DSN, tailrace migrate sql --dialect D
//	tailrace version [--json]
//
// Exit codes: 0 success, 1 the input is invalid (or, for lint --strict, has
// warnings), 2 usage error, 3 explain found no route.
//
// Each group of subcommands lives in its own file and registers its
// constructor in an init function with addCommand, so that groups (policy,
// outbox, ...) can be added without touching this file.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
)

// Exit codes.
const (
	exitOK      = 0
	exitInvalid = 1
	exitUsage   = 2
	exitNoRoute = 3
)

// env is what commands write to; tests pass buffers.
type env struct {
	stdout, stderr io.Writer
}

// exitError ends the command with an exit code; err, when set, is printed
// on stderr. A RunE error of any other type is a usage error.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit %d", e.code)
	}
	return e.err.Error()
}

// commands are the constructors of the top-level subcommands, added by each
// file's init function.
var commands []func(*env) *cobra.Command

func addCommand(f func(*env) *cobra.Command) { commands = append(commands, f) }

func newRoot(e *env) *cobra.Command {
	root := &cobra.Command{
		Use:           "tailrace",
		Short:         "Tools for tailrace services: routing policies and more",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(e.stdout)
	root.SetErr(e.stderr)
	for _, f := range commands {
		root.AddCommand(f(e))
	}
	return root
}

// run executes the command line args and returns the exit code.
func run(args []string, stdout, stderr io.Writer) int {
	e := &env{stdout: stdout, stderr: stderr}
	root := newRoot(e)
	root.SetArgs(args)
	cmd, err := root.ExecuteC()
	if err == nil {
		return exitOK
	}
	// Errors may come from a database driver that quotes its connection
	// string: no password of --db or $TAILRACE_DB is ever printed.
	scrub := newScrubber(args)
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil {
			fmt.Fprintln(stderr, "tailrace:", scrub.String(ee.err.Error()))
		}
		return ee.code
	}
	fmt.Fprintln(stderr, "tailrace:", scrub.String(err.Error()))
	if cmd != nil {
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
	}
	return exitUsage
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
