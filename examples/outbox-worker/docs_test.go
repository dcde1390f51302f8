package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The documentation is checked against the code: README.md and docs/*.md
// quote this sample, and these tests fail when a quote drifts from it.

// docFiles returns README.md and docs/*.md, relative to the repository root
// (the test's working directory is examples/outbox-worker).
func docFiles(t *testing.T) []string {
	t.Helper()
	docs, err := filepath.Glob("../../docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{"../../README.md"}, docs...)
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(string(data), "\n")
}

var snippetMarker = regexp.MustCompile(`^<!-- snippet: (\S+) -->$`)

// TestDocSnippets checks every fenced block announced by a
// "<!-- snippet: PATH -->" line: its lines, ignoring indentation and blank
// lines, must appear in PATH (relative to the repository root) in the same
// order and next to each other. A "// ..." or "..." line elides: the parts it
// separates must appear in that order, anything in between.
func TestDocSnippets(t *testing.T) {
	n := 0
	for _, doc := range docFiles(t) {
		lines := readLines(t, doc)
		for i := 0; i < len(lines); i++ {
			m := snippetMarker.FindStringSubmatch(lines[i])
			if m == nil {
				continue
			}
			where := filepath.Base(doc) + ":" + strconv.Itoa(i+1)
			j := i + 1
			for j < len(lines) && strings.TrimSpace(lines[j]) == "" {
				j++
			}
			if j == len(lines) || !strings.HasPrefix(lines[j], "```") {
				t.Errorf("%s: snippet marker not followed by a fenced block", where)
				continue
			}
			end := j + 1
			for end < len(lines) && lines[end] != "```" {
				end++
			}
			block := lines[j+1 : end]
			i = end
			n++
			src := normalize(readLines(t, filepath.Join("../..", m[1])))
			if err := findChunks(src, block); err != "" {
				t.Errorf("%s: snippet of %s: %s", where, m[1], err)
			}
		}
	}
	if n < 5 {
		t.Fatalf("only %d snippets found", n)
	}
}

// normalize trims every line and drops blank ones.
func normalize(lines []string) []string {
	var out []string
	for _, l := range lines {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

// findChunks reports where block, split at elision lines, is not found in
// src in order.
func findChunks(src, block []string) string {
	var chunks [][]string
	var cur []string
	for _, l := range normalize(block) {
		if l == "// ..." || l == "..." {
			chunks = append(chunks, cur)
			cur = nil
			continue
		}
		cur = append(cur, l)
	}
	chunks = append(chunks, cur)
	from := 0
	for _, c := range chunks {
		if len(c) == 0 {
			continue
		}
		at := -1
		for k := from; k+len(c) <= len(src); k++ {
			if slices.Equal(src[k:k+len(c)], c) {
				at = k
				break
			}
		}
		if at < 0 {
			return "not found (in this order): " + strings.Join(c, " ⏎ ")
		}
		from = at + len(c)
	}
	return ""
}

// TestDocConsole runs every "$ go run ./examples/outbox-worker ..." command of
// a console block in README.md and docs/*.md and compares its output with the
// lines printed under it. Commands that need services (-services, -postgres,
// -amqp) are left to TestServices.
func TestDocConsole(t *testing.T) {
	n := 0
	for _, doc := range docFiles(t) {
		lines := readLines(t, doc)
		in := false
		var cmd []string
		var want strings.Builder
		check := func() {
			if cmd == nil {
				return
			}
			args := cmd
			cmd = nil
			if slices.ContainsFunc(args, func(a string) bool {
				return a == "-services" || strings.HasPrefix(a, "-postgres") || strings.HasPrefix(a, "-amqp")
			}) {
				return
			}
			n++
			exp := want.String()
			t.Run(filepath.Base(doc)+": "+strings.Join(append([]string{"go run ./examples/outbox-worker"}, args...), " "), func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				var out bytes.Buffer
				if err := run(ctx, &out, args); err != nil {
					t.Fatal(err)
				}
				if out.String() != exp {
					t.Errorf("output differs\n--- got\n%s--- want\n%s", out.String(), exp)
				}
			})
		}
		for _, line := range lines {
			switch {
			case !in && line == "```console":
				in = true
			case in && line == "```":
				check()
				in = false
			case in && strings.HasPrefix(line, "$ "):
				check()
				want.Reset()
				if f := strings.Fields(strings.TrimPrefix(line, "$ ")); len(f) >= 3 && f[0] == "go" && f[1] == "run" && f[2] == "./examples/outbox-worker" {
					cmd = append([]string{}, f[3:]...)
				}
			case in && cmd != nil:
				want.WriteString(line + "\n")
			}
		}
	}
	if n < 1 {
		t.Fatal("no go run ./examples/outbox-worker command found in the docs")
	}
}

var mdLink = regexp.MustCompile(`\]\(([^)\s]+)\)`)

var inlineCode = regexp.MustCompile("`[^`]*`")

// TestDocLinks checks that relative links in README.md and docs/*.md (outside
// code) point to files or directories that exist.
func TestDocLinks(t *testing.T) {
	for _, doc := range docFiles(t) {
		fenced := false
		for i, line := range readLines(t, doc) {
			if strings.HasPrefix(line, "```") {
				fenced = !fenced
				continue
			}
			if fenced {
				continue
			}
			line = inlineCode.ReplaceAllString(line, "")
			for _, m := range mdLink.FindAllStringSubmatch(line, -1) {
				target := m[1]
				if strings.Contains(target, "://") || strings.HasPrefix(target, "#") || strings.HasPrefix(target, "mailto:") {
					continue
				}
				target, _, _ = strings.Cut(target, "#")
				if _, err := os.Stat(filepath.Join(filepath.Dir(doc), target)); err != nil {
					t.Errorf("%s:%d: broken link %s", filepath.Base(doc), i+1, m[1])
				}
			}
		}
	}
}
