package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"sort"
	"strconv"

	"github.com/tailrace/tailrace"
)

// exactSetMin is the number of exact values from which a condition uses a
// map instead of a linear scan.
const exactSetMin = 8

// compile turns parsed files into a Policy, adding the errors that need every
// file (duplicate names, two Defaults) to el. It returns nil if el holds any
// error.
func compile(files []*rawFile, el *errList) *Policy {
	p := &Policy{byEvent: map[string][]int32{}}
	var defFile *rawFile
	names := map[string]*rawRule{}
	declared := 0
	for _, f := range files {
		p.files = append(p.files, f.name)
		if f.hasDefault {
			if defFile != nil {
				el.add(&RuleError{File: f.name, Line: f.defPos.Line, Col: f.defPos.Col, Rule: -1, Field: "Default",
					Err: detail(ErrDuplicateDefault, "already defined at %s", defFile.defPos)})
			} else {
				defFile = f
			}
		}
		for _, r := range f.rules {
			if r.name != "" {
				if prev, dup := names[r.name]; dup {
					el.add(&RuleError{File: f.name, Line: r.namePos.Line, Col: r.namePos.Col, Rule: r.index, Name: r.name, Field: "Name",
						Err: detail(ErrDuplicateName, "%q already names rule %d at %s", r.name, prev.index, prev.namePos)})
				} else {
					names[r.name] = r
				}
			}
			rule := &Rule{
				Name:     r.name,
				Priority: r.priority,
				Continue: r.cont,
				Pos:      r.pos,
				FileRule: r.index,
			}
			if rule.Name == "" {
				rule.Name = "rule[" + strconv.Itoa(declared) + "]"
			}
			declared++
			for _, rt := range r.routes {
				rule.Routes = append(rule.Routes, rt.Route)
			}
			for _, c := range r.match {
				rule.Match = append(rule.Match, newCondition(c))
			}
			sort.SliceStable(rule.Match, func(i, j int) bool { return rule.Match[i].Key < rule.Match[j].Key })
			p.rules = append(p.rules, rule)
		}
	}
	if len(el.errs) > 0 {
		return nil
	}
	if defFile != nil {
		p.def = &Rule{Name: "default", IsDefault: true, Pos: defFile.defPos, FileRule: -1}
		for _, rt := range defFile.def {
			p.def.Routes = append(p.def.Routes, rt.Route)
		}
	}
	// Evaluation order: priority descending, then load order.
	sort.SliceStable(p.rules, func(i, j int) bool { return p.rules[i].Priority > p.rules[j].Priority })
	for i, r := range p.rules {
		r.Index = i
		r.self = []*Rule{r}
		r.skip = -1
		for ci := range r.Match {
			c := &r.Match[ci]
			if c.Key == eventKey {
				r.event = c
				r.indexed = len(c.globs) == 0
			}
		}
		switch {
		case r.event == nil:
			p.noEvent = append(p.noEvent, int32(i))
			p.fallback = append(p.fallback, int32(i))
		case r.indexed:
			for _, v := range r.event.exact {
				p.byEvent[v] = append(p.byEvent[v], int32(i))
			}
		default:
			p.fallback = append(p.fallback, int32(i))
		}
	}
	buildIndex(p)
	if p.def != nil {
		p.def.Index = len(p.rules)
		p.def.self = []*Rule{p.def}
	}
	p.version = version(p)
	return p
}

func newCondition(c rawCond) Condition {
	out := Condition{Attr: c.attr, Key: c.key, Values: c.values, Pos: c.pos}
	seen := map[string]bool{}
	for _, v := range c.values {
		if seen[v] {
			continue
		}
		seen[v] = true
		if !isGlob(v) {
			out.exact = append(out.exact, v)
		}
	}
	for _, v := range c.values {
		if isGlob(v) && !seen["\x00"+v] {
			seen["\x00"+v] = true
			out.globs = append(out.globs, glob{pat: v, lit: literalPrefix(v)})
		}
	}
	if len(out.exact) >= exactSetMin {
		out.set = make(map[string]struct{}, len(out.exact))
		for _, v := range out.exact {
			out.set[v] = struct{}{}
		}
	}
	return out
}

// version hashes the meaning of the policy: what Resolve can return.
func version(p *Policy) string {
	type cond struct {
		K string   `json:"k"`
		V []string `json:"v"`
	}
	type rule struct {
		N string  `json:"n"`
		P int     `json:"p"`
		C bool    `json:"c"`
		M []cond  `json:"m"`
		R []Route `json:"r"`
	}
	var doc struct {
		Rules   []rule  `json:"rules"`
		Default []Route `json:"default"`
		HasDef  bool    `json:"hasDefault"`
	}
	for _, r := range p.rules {
		cr := rule{N: r.Name, P: r.Priority, C: r.Continue, R: r.Routes}
		for _, c := range r.Match {
			cr.M = append(cr.M, cond{K: c.Key, V: c.Values})
		}
		doc.Rules = append(doc.Rules, cr)
	}
	if p.def != nil {
		doc.HasDef, doc.Default = true, p.def.Routes
	}
	b, _ := json.Marshal(doc)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

const eventKey = tailrace.MetaKind

// buildIndex chooses up to maxIndexKeys metadata keys, the ones with the most
// distinct exact values first (the most selective), and files each rule
// under its first exact-only condition on one of them; the other rules are
// residual and tried for every message.
func buildIndex(p *Policy) {
	distinct := map[string]map[string]bool{}
	for _, r := range p.rules {
		for _, c := range r.Match {
			if len(c.globs) > 0 {
				continue
			}
			if distinct[c.Key] == nil {
				distinct[c.Key] = map[string]bool{}
			}
			for _, v := range c.exact {
				distinct[c.Key][v] = true
			}
		}
	}
	keys := make([]string, 0, len(distinct))
	for k := range distinct {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		di, dj := len(distinct[keys[i]]), len(distinct[keys[j]])
		if di != dj {
			return di > dj
		}
		return keys[i] < keys[j]
	})
	if len(keys) > maxIndexKeys {
		keys = keys[:maxIndexKeys]
	}
	p.idxKeys = keys
	p.idx = make([]map[string][]int32, len(keys))
	slot := map[string]int{}
	for k, key := range keys {
		p.idx[k] = map[string][]int32{}
		slot[key] = k
	}
	for _, r := range p.rules {
		for ci := range r.Match {
			c := &r.Match[ci]
			c.slot = -1
			if k, ok := slot[c.Key]; ok {
				c.slot = k
			}
		}
	}
rules:
	for i, r := range p.rules {
		for k, key := range keys {
			for ci := range r.Match {
				c := &r.Match[ci]
				if c.Key != key || len(c.globs) > 0 {
					continue
				}
				r.skip = ci
				for _, v := range c.exact {
					p.idx[k][v] = append(p.idx[k][v], int32(i))
				}
				continue rules
			}
		}
		p.residual = append(p.residual, int32(i))
	}
}
