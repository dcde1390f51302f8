package policy

import (
	"cmp"
	"fmt"
	"slices"
	"sort"
	"strings"
)

// Warning is a problem Lint finds in a valid policy: a rule that can never
// decide, or an order that depends on load order.
type Warning struct {
	Pos Position `json:"pos"`
	// Rule is the rule warned about ("default" for the Default, "" for the
	// policy as a whole).
	Rule string `json:"rule"`
	// Kind is "shadowed", "equal-priority", "default-unreachable" or
	// "no-default".
	Kind string `json:"kind"`
	Msg  string `json:"message"`
}

func (w Warning) String() string {
	where := w.Pos.String()
	if where == "" {
		where = "policy"
	}
	if w.Rule == "default" {
		return fmt.Sprintf("%s: warning: Default: %s", where, w.Msg)
	}
	if w.Rule != "" {
		return fmt.Sprintf("%s: warning: rule %s: %s", where, w.Rule, w.Msg)
	}
	return fmt.Sprintf("%s: warning: %s", where, w.Msg)
}

// Lint returns warnings about the policy, ordered by file position:
//
//   - shadowed: an earlier rule without Continue matches every message the
//     rule matches, so the rule never applies;
//   - equal-priority: two rules with the same priority can match one
//     message, so only load order decides (the first one written wins);
//   - default-unreachable: a rule without Continue has an empty Match, so
//     the Default is never used;
//   - no-default: there is no Default and no catch-all rule, so some
//     messages have no route.
//
// The analysis treats two glob patterns as possibly overlapping unless their
// literal prefixes differ, and a glob as covering another only when they are
// identical: it never misses an equal-priority overlap and never reports a
// rule as shadowed when it is not.
func (p *Policy) Lint() []Warning {
	var ws []Warning
	var catchAll *Rule
	for _, b := range p.rules {
		if catchAll == nil && len(b.Match) == 0 && !b.Continue {
			catchAll = b
		}
		shadow := (*Rule)(nil)
		p.candidates(b, func(a *Rule) bool {
			if !a.Continue && covers(a, b) {
				shadow = a
				return false
			}
			return true
		})
		if shadow != nil {
			ws = append(ws, Warning{Pos: b.Pos, Rule: b.Name, Kind: "shadowed", Msg: fmt.Sprintf(
				"never applies: rule %s (priority %d, %s) matches every message it matches and is tried first",
				shadow.Name, shadow.Priority, shadow.Pos)})
			continue
		}
		p.candidates(b, func(a *Rule) bool {
			if a.Priority != b.Priority || a.Continue {
				return true
			}
			if ex, ok := overlap(a, b); ok {
				ws = append(ws, Warning{Pos: b.Pos, Rule: b.Name, Kind: "equal-priority", Msg: fmt.Sprintf(
					"same priority %d as rule %s (%s) and both can match one message (e.g. %s): %s wins because it comes first in load order; give them different priorities",
					b.Priority, a.Name, a.Pos, ex, a.Name)})
			}
			return true
		})
	}
	switch {
	case p.def != nil && catchAll != nil:
		ws = append(ws, Warning{Pos: p.def.Pos, Rule: "default", Kind: "default-unreachable", Msg: fmt.Sprintf(
			"never applies: rule %s (%s) has an empty Match and no Continue, so it matches every message first",
			catchAll.Name, catchAll.Pos)})
	case p.def == nil && catchAll == nil:
		pos := Position{}
		if len(p.files) > 0 {
			pos.File = p.files[0]
		}
		ws = append(ws, Warning{Pos: pos, Kind: "no-default", Msg: "no Default and no rule with an empty Match: messages that match no rule have no route (Resolve returns ErrNoRoute)"})
	}
	sort.SliceStable(ws, func(i, j int) bool {
		a, b := ws[i].Pos, ws[j].Pos
		return cmp.Or(cmp.Compare(a.File, b.File), cmp.Compare(a.Line, b.Line), cmp.Compare(a.Col, b.Col)) < 0
	})
	return ws
}

// candidates calls fn, in evaluation order, for each rule before b that could
// match a message b matches, as far as the Event index tells; fn returns
// false to stop.
func (p *Policy) candidates(b *Rule, fn func(a *Rule) bool) {
	var lists [][]int32
	switch {
	case b.event == nil:
		lists = append(lists, p.noEvent)
	default:
		lists = append(lists, p.fallback)
		if b.indexed {
			for _, v := range b.event.exact {
				lists = append(lists, p.byEvent[v])
			}
		}
	}
	var ords []int32
	for _, l := range lists {
		for _, o := range l {
			if int(o) >= b.Index {
				break
			}
			ords = append(ords, o)
		}
	}
	slices.Sort(ords)
	ords = slices.Compact(ords)
	for _, o := range ords {
		if !fn(p.rules[o]) {
			return
		}
	}
}

// covers reports whether every message b matches is also matched by a.
func covers(a, b *Rule) bool {
	for i := range a.Match {
		ca := &a.Match[i]
		cb := b.cond(ca.Key)
		if cb == nil {
			return false
		}
		for _, v := range cb.Values {
			if isGlob(v) {
				if !slices.Contains(ca.globs, glob{pat: v, lit: literalPrefix(v)}) {
					return false
				}
			} else if !ca.match(v) {
				return false
			}
		}
	}
	return true
}

// overlap reports whether a and b may match one message, with an example.
func overlap(a, b *Rule) (string, bool) {
	keys := map[string]string{}
	for i := range a.Match {
		ca := &a.Match[i]
		cb := b.cond(ca.Key)
		if cb == nil {
			keys[ca.Key] = ca.Values[0]
			continue
		}
		ex, ok := common(ca, cb)
		if !ok {
			return "", false
		}
		keys[ca.Key] = ex
	}
	for i := range b.Match {
		if _, ok := keys[b.Match[i].Key]; !ok {
			keys[b.Match[i].Key] = b.Match[i].Values[0]
		}
	}
	if len(keys) == 0 {
		return "any message", true
	}
	parts := make([]string, 0, len(keys))
	for k, v := range keys {
		parts = append(parts, k+"="+v)
	}
	sort.Strings(parts)
	return strings.Join(parts, " "), true
}

// common returns a value both conditions may accept.
func common(a, b *Condition) (string, bool) {
	for _, v := range b.Values {
		if !isGlob(v) && a.match(v) {
			return v, true
		}
	}
	for _, v := range a.Values {
		if !isGlob(v) && b.match(v) {
			return v, true
		}
	}
	for _, ga := range a.globs {
		for _, gb := range b.globs {
			if globsMayOverlap(ga.pat, gb.pat) {
				return ga.pat, true
			}
		}
	}
	return "", false
}

// globsMayOverlap is false only when the literal prefixes of two globs show
// that no string matches both ("eu-*" and "us-*"); otherwise it assumes
// they may.
func globsMayOverlap(a, b string) bool {
	pa, pb := literalPrefix(a), literalPrefix(b)
	return strings.HasPrefix(pa, pb) || strings.HasPrefix(pb, pa)
}

func literalPrefix(g string) string {
	if i := strings.IndexAny(g, `*?[\`); i >= 0 {
		return g[:i]
	}
	return g
}

func (r *Rule) cond(key string) *Condition {
	for i := range r.Match {
		if r.Match[i].Key == key {
			return &r.Match[i]
		}
	}
	return nil
}
