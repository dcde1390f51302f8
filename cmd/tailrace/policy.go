package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/policy"
)

func init() { addCommand(newPolicyCmd) }

func newPolicyCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Check and explain routing policy files",
		Long: `Routing policies are JSON files that decide which publishers and destinations
each message goes to (see docs/policy.md). A directory argument stands for
the *.json files directly inside it, in lexical order.`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("unknown command %q for %q", args[0], cmd.CommandPath())
			}
			return fmt.Errorf("%s needs a subcommand: lint or explain", cmd.CommandPath())
		},
	}
	cmd.AddCommand(newLintCmd(e), newExplainCmd(e))
	return cmd
}

// loadFlags are the flags shared by lint and explain.
type loadFlags struct {
	publishers []string
	json       bool
}

func (f *loadFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringSliceVar(&f.publishers, "publishers", nil,
		"registered publisher keys (comma-separated); when set, every Key must be one of them")
	cmd.Flags().BoolVar(&f.json, "json", false, "print machine-readable JSON")
}

func (f *loadFlags) options() *policy.LoadOptions {
	if len(f.publishers) == 0 {
		return nil
	}
	known := map[string]bool{}
	for _, p := range f.publishers {
		known[strings.TrimSpace(p)] = true
	}
	return &policy.LoadOptions{KnownPublishers: func(k string) bool { return known[k] }}
}

// jsonError is a load error in --json output.
type jsonError struct {
	File    string `json:"file,omitempty"`
	Line    int    `json:"line,omitempty"`
	Col     int    `json:"col,omitempty"`
	Rule    *int   `json:"rule,omitempty"`
	Name    string `json:"name,omitempty"`
	Field   string `json:"field,omitempty"`
	Message string `json:"message"`
}

// flatten lists the errors inside err (errors.Join trees), in order.
func flatten(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, flatten(e)...)
		}
		return out
	}
	return []error{err}
}

func errorLines(err error) []string {
	var out []string
	for _, e := range flatten(err) {
		out = append(out, strings.TrimPrefix(e.Error(), "policy: "))
	}
	return out
}

func jsonErrors(err error) []jsonError {
	out := []jsonError{}
	for _, e := range flatten(err) {
		var re *policy.RuleError
		if !errors.As(e, &re) {
			out = append(out, jsonError{Message: e.Error()})
			continue
		}
		je := jsonError{File: re.File, Line: re.Line, Col: re.Col, Name: re.Name, Field: re.Field, Message: re.Err.Error()}
		if re.Rule >= 0 {
			r := re.Rule
			je.Rule = &r
		}
		out = append(out, je)
	}
	return out
}

func writeJSON(e *env, v any) error {
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newLintCmd(e *env) *cobra.Command {
	var f loadFlags
	var strict bool
	cmd := &cobra.Command{
		Use:   "lint FILE|DIR...",
		Short: "Validate policy files and warn about rules that cannot win",
		Long: `lint loads the files as one policy and reports every error with its
file:line:column, rule and field. On a valid policy it warns about rules that
can never apply (shadowed by a rule tried before them), equal-priority rules
that can match the same message, an unreachable Default, and a policy that
leaves some messages without a route.

Exit status: 0 valid (warnings allowed unless --strict), 1 invalid or, with
--strict, any warning, 2 usage error.`,
		Example: `  tailrace policy lint policies/
  tailrace policy lint --publishers rabbitmq,kafka --strict routing.json`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return lint(e, args, &f, strict)
		},
	}
	f.register(cmd)
	cmd.Flags().BoolVar(&strict, "strict", false, "exit 1 when there are warnings")
	return cmd
}

type lintReport struct {
	Valid    bool             `json:"valid"`
	Version  string           `json:"version,omitempty"`
	Files    []string         `json:"files,omitempty"`
	Rules    int              `json:"rules"`
	Default  bool             `json:"default"`
	Errors   []jsonError      `json:"errors"`
	Warnings []policy.Warning `json:"warnings"`
}

func lint(e *env, paths []string, f *loadFlags, strict bool) error {
	p, err := policy.Load(paths, f.options())
	rep := lintReport{Valid: err == nil, Errors: []jsonError{}, Warnings: []policy.Warning{}}
	if err != nil {
		rep.Errors = jsonErrors(err)
	} else {
		rep.Version, rep.Files, rep.Rules, rep.Default = p.Version(), p.Files(), len(p.Rules()), p.Default() != nil
		rep.Warnings = append(rep.Warnings, p.Lint()...)
	}
	if f.json {
		if err := writeJSON(e, rep); err != nil {
			return &exitError{code: exitInvalid, err: err}
		}
	} else if err != nil {
		for _, l := range errorLines(err) {
			fmt.Fprintln(e.stdout, l)
		}
		fmt.Fprintf(e.stdout, "FAIL: %d error(s)\n", len(rep.Errors))
	} else {
		for _, w := range rep.Warnings {
			fmt.Fprintln(e.stdout, w)
		}
		def := "no Default"
		if rep.Default {
			def = "Default"
		}
		fmt.Fprintf(e.stdout, "OK: %d file(s), %d rule(s), %s, version %s, %d warning(s)\n",
			len(rep.Files), rep.Rules, def, rep.Version, len(rep.Warnings))
	}
	if !rep.Valid || (strict && len(rep.Warnings) > 0) {
		return &exitError{code: exitInvalid}
	}
	return nil
}

func newExplainCmd(e *env) *cobra.Command {
	var f loadFlags
	var event, domain, tier string
	var attrs []string
	cmd := &cobra.Command{
		Use:   "explain FILE|DIR... --event NAME",
		Short: "Show which rule routes a message, and why the rules before it did not",
		Long: `explain builds a message from the flags (--event sets the "kind" metadata,
--domain "domain", --tenant-tier "tenant_tier", --attr any other key), then
prints every rule tried in evaluation order with the reason it did not match,
the rule that decides, and its publishers and destinations.

Exit status: 0 routed, 1 invalid policy, 2 usage error, 3 no route.`,
		Example: `  tailrace policy explain policies/ --event ContentPublishedIntegrationEvent --tenant-tier free
  tailrace policy explain routing.json --event OrderPlaced --attr region=eu-west --json`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			meta := map[string]string{tailrace.MetaKind: event}
			set := func(k, v string) {
				if v != "" {
					meta[k] = v
				}
			}
			set(tailrace.MetaDomain, domain)
			set(tailrace.MetaTenantTier, tier)
			for _, a := range attrs {
				k, v, ok := strings.Cut(a, "=")
				if !ok || k == "" {
					return fmt.Errorf("--attr %q: want key=value", a)
				}
				if _, dup := meta[k]; dup || slices.Contains([]string{tailrace.MetaKind, tailrace.MetaDomain, tailrace.MetaTenantTier}, k) {
					return fmt.Errorf("--attr %q: %s is set twice (use --event, --domain, --tenant-tier for kind, domain, tenant_tier)", a, k)
				}
				meta[k] = v
			}
			return explain(e, args, &f, meta)
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&event, "event", "", "message kind (metadata \"kind\", the policy's Event)")
	cmd.Flags().StringVar(&domain, "domain", "", "message domain (metadata \"domain\")")
	cmd.Flags().StringVar(&tier, "tenant-tier", "", "tenant tier (metadata \"tenant_tier\")")
	cmd.Flags().StringArrayVar(&attrs, "attr", nil, "other metadata as key=value (repeatable)")
	_ = cmd.MarkFlagRequired("event")
	return cmd
}

func explain(e *env, paths []string, f *loadFlags, meta map[string]string) error {
	p, err := policy.Load(paths, f.options())
	if err != nil {
		if f.json {
			_ = writeJSON(e, map[string]any{"valid": false, "errors": jsonErrors(err)})
		} else {
			for _, l := range errorLines(err) {
				fmt.Fprintln(e.stdout, l)
			}
			fmt.Fprintf(e.stdout, "FAIL: %d error(s)\n", len(flatten(err)))
		}
		return &exitError{code: exitInvalid}
	}
	x := p.Explain(meta)
	if f.json {
		if err := writeJSON(e, x); err != nil {
			return &exitError{code: exitInvalid, err: err}
		}
	} else {
		fmt.Fprint(e.stdout, x)
	}
	if !x.Routed {
		return &exitError{code: exitNoRoute}
	}
	return nil
}
