package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
)

func TestReadVersion(t *testing.T) {
	bi := &debug.BuildInfo{
		GoVersion: "go1.26.0",
		Main:      debug.Module{Path: tailraceModule, Version: "v1.4.0"},
		Settings: []debug.BuildSetting{
			{Key: "vcs.revision", Value: "0123456789abcdef"}, {Key: "vcs.time", Value: "2026-12-04T10:00:00Z"}, {Key: "vcs.modified", Value: "true"},
		},
	}
	v := readVersion(bi)
	if v.Version != "v1.4.0" || v.Revision != "0123456789abcdef" || !v.Modified || v.String() !=
		"tailrace v1.4.0\n  revision 0123456789abcdef (modified), 2026-12-04T10:00:00Z\n  go1.26.0" {
		t.Fatalf("%+v\n%s", v, v)
	}
	// Linked into a user's binary: the tailrace dependency's version.
	bi = &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Path: "example.com/svc"},
		Deps: []*debug.Module{{Path: tailraceModule, Version: "v1.3.2"}}}
	if v := readVersion(bi); v.String() != "example.com/svc (devel) (tailrace v1.3.2)\n  go1.26.0" {
		t.Fatalf("%q", v.String())
	}
}

// TestVersionBuilt builds the command in this checkout, as a user would,
// and checks that `tailrace version` reports the revision git has.
func TestVersionBuilt(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	rev, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Skipf("not in a git checkout: %v", err)
	}
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Skipf("not in a git checkout: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(strings.TrimSpace(string(top)), ".git")); err != nil || !fi.IsDir() {
		// cmd/go looks for a .git directory; a worktree has a .git file.
		t.Skip("go build stamps VCS information only when .git is a directory (this is a git worktree)")
	}
	bin := filepath.Join(t.TempDir(), "tailrace")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "GOFLAGS=-buildvcs=true")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "version", "--json").Output()
	if err != nil {
		t.Fatal(err)
	}
	var v versionInfo
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if v.Module != tailraceModule || v.Revision != strings.TrimSpace(string(rev)) || v.Version == "" || !strings.HasPrefix(v.GoVersion, "go") {
		t.Fatalf("version --json = %+v; want revision %s", v, rev)
	}
	text, _ := exec.Command(bin, "version").Output()
	if !strings.HasPrefix(string(text), "tailrace ") || !strings.Contains(string(text), "revision "+v.Revision) {
		t.Fatalf("version:\n%s", text)
	}
}
