package main

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"testing"
)

// TestDocsConsole runs every command of the console blocks in
// docs/policy.md, docs/getting-started.md and README.md, from the repository
// root, and compares the output printed under it. A command is "tailrace ..." or
// "go run ./cmd/tailrace ..."; a trailing `; echo "exit $?"` prints the exit
// status as the shell would.
func TestDocsConsole(t *testing.T) {
	t.Chdir("../..")
	n := 0
	for _, doc := range []string{"docs/policy.md", "docs/getting-started.md", "README.md"} {
		data, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range consoleCommands(string(data)) {
			args := strings.Fields(c.cmd)
			switch {
			case len(args) > 0 && args[0] == "tailrace":
				args = args[1:]
			case len(args) > 2 && args[0] == "go" && args[1] == "run" && args[2] == "./cmd/tailrace":
				args = args[3:]
			default:
				continue
			}
			n++
			t.Run(doc+": "+c.cmd, func(t *testing.T) {
				var out bytes.Buffer
				code := run(args, &out, &out)
				if c.echoExit {
					out.WriteString("exit " + strconv.Itoa(code) + "\n")
				} else if code != 0 {
					t.Errorf("exit %d", code)
				}
				if out.String() != c.want {
					t.Errorf("output differs\n--- got\n%s--- want\n%s", out.String(), c.want)
				}
			})
		}
	}
	if n < 5 {
		t.Fatalf("only %d commands found", n)
	}
}

type consoleCommand struct {
	cmd      string
	echoExit bool
	want     string
}

func consoleCommands(md string) []consoleCommand {
	var out []consoleCommand
	in := false
	var cur *consoleCommand
	flush := func() {
		if cur != nil {
			out = append(out, *cur)
			cur = nil
		}
	}
	for _, line := range strings.Split(md, "\n") {
		switch {
		case !in && line == "```console":
			in = true
		case in && line == "```":
			flush()
			in = false
		case in && strings.HasPrefix(line, "$ "):
			flush()
			cmd := strings.TrimPrefix(line, "$ ")
			c := consoleCommand{cmd: cmd}
			if before, ok := strings.CutSuffix(cmd, `; echo "exit $?"`); ok {
				c.cmd, c.echoExit = before, true
			}
			cur = &c
		case in && cur != nil:
			cur.want += line + "\n"
		}
	}
	return out
}
