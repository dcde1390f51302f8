package main

import (
	"fmt"
	"runtime/debug"

	"github.com/spf13/cobra"
)

func init() { addCommand(newVersionCmd) }

// versionInfo is what `tailrace version` prints.
type versionInfo struct {
	// Module is the module the binary was built from and Version its
	// version: a release tag with `go install …@vX.Y.Z`, a pseudo-version
	// or "(devel)" when built from a checkout.
	Module  string `json:"module"`
	Version string `json:"version"`
	// Revision, Time and Modified come from the version control system
	// when the binary was built in a checkout (go build stamps them);
	// empty for `go install …@version`.
	Revision string `json:"vcs_revision,omitempty"`
	Time     string `json:"vcs_time,omitempty"`
	Modified bool   `json:"vcs_modified,omitempty"`
	// Tailrace is the version of the tailrace module linked in, when the
	// binary's main module is another one.
	Tailrace  string `json:"tailrace,omitempty"`
	GoVersion string `json:"go"`
}

const tailraceModule = "github.com/tailrace/tailrace"

// readVersion extracts versionInfo from build information.
func readVersion(bi *debug.BuildInfo) versionInfo {
	v := versionInfo{Module: bi.Main.Path, Version: bi.Main.Version, GoVersion: bi.GoVersion}
	if v.Version == "" {
		v.Version = "(devel)"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Revision = s.Value
		case "vcs.time":
			v.Time = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	if bi.Main.Path != tailraceModule {
		for _, d := range bi.Deps {
			if d.Path == tailraceModule {
				v.Tailrace = d.Version
				if d.Replace != nil {
					v.Tailrace += " => " + d.Replace.Path + " " + d.Replace.Version
				}
			}
		}
	}
	return v
}

func (v versionInfo) String() string {
	s := "tailrace " + v.Version
	if v.Module != tailraceModule && v.Module != "" {
		s = v.Module + " " + v.Version
		if v.Tailrace != "" {
			s += " (tailrace " + v.Tailrace + ")"
		}
	}
	if v.Revision != "" {
		s += "\n  revision " + v.Revision
		if v.Modified {
			s += " (modified)"
		}
		if v.Time != "" {
			s += ", " + v.Time
		}
	}
	return s + "\n  " + v.GoVersion
}

func newVersionCmd(e *env) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the module version and VCS revision the binary was built from",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bi, ok := debug.ReadBuildInfo()
			if !ok {
				return &exitError{code: exitInvalid, err: fmt.Errorf("version: the binary carries no build information (built without module support?)")}
			}
			v := readVersion(bi)
			if asJSON {
				return writeJSON(e, v)
			}
			fmt.Fprintln(e.stdout, v)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print machine-readable JSON")
	return cmd
}
