package policy

import (
	"path"
	"strconv"
	"strings"
)

// Route is one place a message goes: a publisher of the bus registry, by key,
// and the destination (topic, exchange or subject) it publishes to.
type Route struct {
	Key         string `json:"key"`
	Destination string `json:"destination"`
}

// Position is a place in a policy file. Line and Col are 1-based.
type Position struct {
	File string `json:"file"`
	Line int    `json:"line"`
	Col  int    `json:"col"`
}

func (p Position) String() string {
	if p.Line == 0 {
		return p.File
	}
	return p.File + ":" + strconv.Itoa(p.Line) + ":" + strconv.Itoa(p.Col)
}

// Condition is one entry of a rule's Match: the attribute must be present,
// non-empty, and equal one of Values (a value containing * ? [ or \ is a
// glob, see package doc).
type Condition struct {
	// Attr is the attribute as written in the policy: "Event", "Domain",
	// "TenantTier" or a metadata key.
	Attr string `json:"attr"`
	// Key is the metadata key the condition reads (tailrace.MetaKind for
	// Event, and so on).
	Key string `json:"key"`
	// Values are the accepted values, exact strings or globs, in file order.
	Values []string `json:"values"`
	Pos    Position `json:"-"`

	exact []string
	set   map[string]struct{}
	globs []glob
	slot  int // index of Key in the policy's index keys, -1 if not one
}

// match reports whether v (present and non-empty) satisfies the condition.
func (c *Condition) match(v string) bool {
	if c.set != nil {
		if _, ok := c.set[v]; ok {
			return true
		}
	} else {
		for _, e := range c.exact {
			if e == v {
				return true
			}
		}
	}
	for _, g := range c.globs {
		if strings.HasPrefix(v, g.lit) {
			if ok, _ := path.Match(g.pat, v); ok {
				return true
			}
		}
	}
	return false
}

// glob is a pattern and its literal prefix, a cheap first test.
type glob struct{ pat, lit string }

// Rule is a compiled rule. A *Rule belongs to its Policy and is immutable:
// read its fields, never modify them.
type Rule struct {
	// Name is the rule's Name, or "rule[N]" for an unnamed rule, N being its
	// position in load order (files in the order loaded, rules as written).
	// The Default pseudo-rule is named "default".
	Name string `json:"name"`
	// Index is the rule's position in evaluation order (0 is tried first);
	// the Default has Index len(Rules()).
	Index int `json:"index"`
	// Priority as written; higher is tried first.
	Priority int `json:"priority"`
	// Continue: when this rule matches, its routes are used and evaluation
	// goes on with the next rule.
	Continue bool `json:"continue,omitempty"`
	// IsDefault marks the Default pseudo-rule.
	IsDefault bool `json:"default,omitempty"`
	// Match is the rule's conditions, sorted by Key. Empty matches every
	// message.
	Match []Condition `json:"match"`
	// Routes are the rule's publishers in file order.
	Routes []Route `json:"routes"`
	// Pos is where the rule starts; FileRule is its index in that file's
	// Rules list (-1 for the Default).
	Pos      Position `json:"pos"`
	FileRule int      `json:"fileRule"`

	skip    int        // Match index the resolve index already satisfied, -1 if none
	event   *Condition // the Event condition, nil if none (for Lint)
	indexed bool       // every Event value is exact (for Lint)
	self    []*Rule    // one-element slice holding the rule, for Result.Matched
}

// matches checks every condition except the one at index skip, which the
// caller knows holds. vals holds the message's values of the index keys,
// which conditions on those keys read instead of the map.
func (r *Rule) matches(attrs map[string]string, skip int, vals *[maxIndexKeys]string) bool {
	for i := range r.Match {
		if i == skip {
			continue
		}
		c := &r.Match[i]
		var v string
		if c.slot >= 0 {
			v = vals[c.slot]
		} else {
			v = attrs[c.Key]
		}
		if v == "" || !c.match(v) {
			return false
		}
	}
	return true
}

// Policy is a compiled, immutable routing policy. It is safe for concurrent
// use; Resolve is a pure function of the attributes it is given.
type Policy struct {
	version string
	files   []string
	rules   []*Rule
	def     *Rule

	// The resolve index: each rule is listed once, under the value(s) of
	// one exact-only condition (idx[k] for metadata key idxKeys[k]), or in
	// residual. Lists hold positions in evaluation order, ascending.
	idxKeys  []string
	idx      []map[string][]int32
	residual []int32

	// Lint's index: by exact Event value, and the rest.
	byEvent  map[string][]int32
	fallback []int32 // rules without Event or with an Event glob
	noEvent  []int32 // rules without Event
}

// maxIndexKeys bounds the metadata keys the resolve index uses.
const maxIndexKeys = 6

// Version is the policy's content hash: 16 hex digits of a SHA-256 over the
// compiled rules (names, priorities, order, conditions, routes, Default).
// Formatting, key spelling and the split into files do not change it; any
// change of meaning does. Stamp it as tailrace.MetaPolicyVersion.
func (p *Policy) Version() string { return p.version }

// Files lists the files the policy was loaded from, in load order.
func (p *Policy) Files() []string { return append([]string(nil), p.files...) }

// Rules returns the rules in evaluation order (highest priority first). The
// returned slice is a copy; the rules themselves must not be modified.
func (p *Policy) Rules() []*Rule { return append([]*Rule(nil), p.rules...) }

// Default returns the Default pseudo-rule, or nil when no file defines one.
func (p *Policy) Default() *Rule { return p.def }

// Result is the outcome of Resolve. Its slices are read-only: they may alias
// the policy's own data.
type Result struct {
	// Version is the policy version (stamp as tailrace.MetaPolicyVersion).
	Version string
	// Rule is the rule that decided: the first matching rule without
	// Continue, or the Default; when only Continue rules matched and there
	// is no Default, the last of them. Nil when the message has no route.
	Rule *Rule
	// Matched is every rule that contributed routes, in evaluation order:
	// the matching Continue rules, then Rule.
	Matched []*Rule
	// Routes is the union of the Matched rules' routes, in order, each
	// (Key, Destination) once.
	Routes []Route

	routeBuf []Route
	ruleBuf  []*Rule
}

// RuleStamp is the value for tailrace.MetaPolicyRule: the name of the
// deciding rule, or the names of all Matched rules joined with "," when
// Continue rules contributed. It allocates only in that second case.
func (r *Result) RuleStamp() string {
	switch len(r.Matched) {
	case 0:
		return ""
	case 1:
		return r.Matched[0].Name
	}
	var b strings.Builder
	for i, m := range r.Matched {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(m.Name)
	}
	return b.String()
}

// Resolve returns the routes for a message with these attributes (Watermill
// metadata: message.Metadata converts implicitly). It does not allocate
// unless Continue rules contribute; see ResolveInto for that case. It returns
// ErrNoRoute when nothing matches and there is no Default.
func (p *Policy) Resolve(attrs map[string]string) (Result, error) {
	var r Result
	err := p.ResolveInto(attrs, &r)
	return r, err
}

// ResolveInto is Resolve writing into r, reusing r's buffers: once r has held
// the longest Continue chain it will see, it never allocates. r must not be
// shared between goroutines.
func (p *Policy) ResolveInto(attrs map[string]string, r *Result) error {
	r.Version = p.version
	r.Rule, r.Matched, r.Routes = nil, nil, nil
	chained := false

	// Candidate lists: one per index key the message has a value for, and
	// the residual rules; merged in evaluation order.
	var heads [maxIndexKeys + 1][]int32
	var vals [maxIndexKeys]string
	n := 0
	for k, key := range p.idxKeys {
		if v := attrs[key]; v != "" {
			vals[k] = v
			if l := p.idx[k][v]; len(l) > 0 {
				heads[n] = l
				n++
			}
		}
	}
	if len(p.residual) > 0 {
		heads[n] = p.residual
		n++
	}
	for {
		best, ord := -1, int32(0)
		for h := 0; h < n; h++ {
			if len(heads[h]) > 0 && (best < 0 || heads[h][0] < ord) {
				best, ord = h, heads[h][0]
			}
		}
		if best < 0 {
			break
		}
		heads[best] = heads[best][1:]
		rule := p.rules[ord]
		if !rule.matches(attrs, rule.skip, &vals) {
			continue
		}
		if rule.Continue {
			if !chained {
				chained = true
				r.ruleBuf, r.routeBuf = r.ruleBuf[:0], r.routeBuf[:0]
			}
			r.addChain(rule)
			continue
		}
		r.decide(rule, chained)
		return nil
	}
	if p.def != nil {
		r.decide(p.def, chained)
		return nil
	}
	if chained {
		// Only Continue rules matched and there is no Default: their
		// routes are the result; the last of them counts as deciding.
		r.Rule = r.ruleBuf[len(r.ruleBuf)-1]
		r.Matched, r.Routes = r.ruleBuf, r.routeBuf
		return nil
	}
	return ErrNoRoute
}

func (r *Result) addChain(rule *Rule) {
	r.ruleBuf = append(r.ruleBuf, rule)
outer:
	for _, rt := range rule.Routes {
		for _, have := range r.routeBuf {
			if have == rt {
				continue outer
			}
		}
		r.routeBuf = append(r.routeBuf, rt)
	}
}

func (r *Result) decide(rule *Rule, chained bool) {
	r.Rule = rule
	if !chained {
		r.Matched, r.Routes = rule.self, rule.Routes
		return
	}
	r.addChain(rule)
	r.Matched, r.Routes = r.ruleBuf, r.routeBuf
}
