package policy

import (
	"fmt"
	"maps"
	"sort"
	"strconv"
	"strings"
)

// Explanation tells how a message with given attributes is routed: every rule
// tried, in evaluation order, up to the one that decided, and why each did or
// did not match. It is plain data, ready for encoding/json.
type Explanation struct {
	Version    string            `json:"version"`
	Attributes map[string]string `json:"attributes"`
	// Routed is false when nothing matched and there is no Default.
	Routed bool `json:"routed"`
	// Decision is the rule that decided (see Result.Rule); nil when not
	// routed.
	Decision *Step `json:"decision"`
	// Steps are the rules tried, in evaluation order, the decision last.
	Steps []Step `json:"steps"`
	// Rules are the names of the rules that contributed routes (the value
	// stamped as tailrace.MetaPolicyRule, split).
	Rules  []string `json:"rules"`
	Routes []Route  `json:"routes"`
	// Tied names the rules that have the deciding rule's priority, come
	// after it in load order and match too: they lost only by load order.
	Tied []string `json:"tied,omitempty"`
}

// Step is one rule tried.
type Step struct {
	Rule     string   `json:"rule"`
	Index    int      `json:"index"`
	Priority int      `json:"priority"`
	Default  bool     `json:"default,omitempty"`
	Continue bool     `json:"continue,omitempty"`
	Pos      Position `json:"pos"`
	Matched  bool     `json:"matched"`
	// Reason says why the rule did not match: the first failing condition.
	Reason string  `json:"reason,omitempty"`
	Routes []Route `json:"routes"`
}

func stepOf(r *Rule) Step {
	return Step{Rule: r.Name, Index: r.Index, Priority: r.Priority, Default: r.IsDefault,
		Continue: r.Continue, Pos: r.Pos, Routes: r.Routes}
}

// Explain evaluates every rule in order, without the index Resolve uses, and
// records each outcome. Its result always agrees with Resolve.
func (p *Policy) Explain(attrs map[string]string) *Explanation {
	e := &Explanation{Version: p.version, Attributes: maps.Clone(attrs)}
	var res Result
	err := p.ResolveInto(attrs, &res)
	e.Routed = err == nil
	for _, m := range res.Matched {
		e.Rules = append(e.Rules, m.Name)
	}
	e.Routes = append([]Route(nil), res.Routes...)
	for _, r := range p.rules {
		s := stepOf(r)
		s.Reason = r.whyNot(attrs)
		s.Matched = s.Reason == ""
		e.Steps = append(e.Steps, s)
		if res.Rule == r && !r.Continue {
			break
		}
	}
	if p.def != nil && res.Rule == p.def {
		s := stepOf(p.def)
		s.Matched = true
		e.Steps = append(e.Steps, s)
	}
	if res.Rule != nil {
		for _, s := range e.Steps {
			if s.Index == res.Rule.Index {
				e.Decision = &s
			}
		}
		if !res.Rule.IsDefault {
			for _, r := range p.rules[res.Rule.Index+1:] {
				if r.Priority != res.Rule.Priority {
					break
				}
				if r.whyNot(attrs) == "" {
					e.Tied = append(e.Tied, r.Name)
				}
			}
		}
	}
	return e
}

// whyNot returns "" if the rule matches attrs, else the first failing
// condition in words.
func (r *Rule) whyNot(attrs map[string]string) string {
	for i := range r.Match {
		c := &r.Match[i]
		v := attrs[c.Key]
		name := c.Attr
		if !strings.EqualFold(c.Attr, c.Key) {
			name += " (" + c.Key + ")"
		}
		if v == "" {
			return name + ": message has no " + c.Key
		}
		if !c.match(v) {
			if len(c.Values) == 1 {
				return name + ": " + strconv.Quote(v) + " does not match " + strconv.Quote(c.Values[0])
			}
			q := make([]string, len(c.Values))
			for i, x := range c.Values {
				q[i] = strconv.Quote(x)
			}
			return name + ": " + strconv.Quote(v) + " matches none of " + strings.Join(q, ", ")
		}
	}
	return ""
}

// String renders the explanation for people.
func (e *Explanation) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "policy version %s\n", e.Version)
	keys := make([]string, 0, len(e.Attributes))
	for k := range e.Attributes {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	b.WriteString("message:")
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%q", k, e.Attributes[k])
	}
	b.WriteString("\n\n")
	for _, s := range e.Steps {
		verdict := "no match: " + s.Reason
		switch {
		case s.Default:
			verdict = "no rule decided: Default applies"
		case s.Matched && s.Continue:
			verdict = "MATCH (Continue: routes added, evaluation goes on)"
		case s.Matched:
			verdict = "MATCH (decides)"
		}
		prio := "priority " + strconv.Itoa(s.Priority)
		if s.Default {
			prio = "-"
		}
		fmt.Fprintf(&b, "  %-4s %-24s %-14s %s\n       %s\n", "#"+strconv.Itoa(s.Index), s.Rule, prio, s.Pos, verdict)
	}
	b.WriteString("\n")
	if !e.Routed {
		b.WriteString("result: NO ROUTE (no rule matches and the policy has no Default)\n")
		return b.String()
	}
	d := e.Decision
	if d.Default {
		b.WriteString("result: Default")
	} else {
		fmt.Fprintf(&b, "result: rule %s (priority %d) at %s", d.Rule, d.Priority, d.Pos)
	}
	if len(e.Rules) > 1 {
		fmt.Fprintf(&b, "; rules contributing: %s", strings.Join(e.Rules, ","))
	}
	if len(e.Tied) > 0 {
		verb := "matches"
		if len(e.Tied) > 1 {
			verb = "match"
		}
		fmt.Fprintf(&b, "\nnote: %s also %s at the same priority %d; load order decided", strings.Join(e.Tied, ", "), verb, d.Priority)
	}
	b.WriteString("\nroutes:\n")
	for _, r := range e.Routes {
		fmt.Fprintf(&b, "  %s -> %s\n", r.Key, r.Destination)
	}
	return b.String()
}
