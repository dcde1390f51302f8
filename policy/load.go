package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/tailrace/tailrace"
)

// Limits bound what a policy may contain, so that a hostile or broken file
// fails with a clear error instead of exhausting memory. A zero field takes
// its default.
type Limits struct {
	// MaxFileBytes is the largest file accepted. Default 4 MiB.
	MaxFileBytes int64
	// MaxFiles is the most files one policy may have. Default 1,000.
	MaxFiles int
	// MaxRules is the most rules, all files together. Default 50,000.
	MaxRules int
	// MaxPublishers is the most publishers in one list. Default 100.
	MaxPublishers int
	// MaxConditions is the most keys in one Match. Default 64.
	MaxConditions int
	// MaxValues is the most values in one condition's list. Default 1,000.
	MaxValues int
	// MaxStringBytes is the longest string (name, key, value, destination).
	// Default 1,024.
	MaxStringBytes int
	// MaxDepth is the deepest JSON nesting accepted (the format itself needs
	// 6). Default 16.
	MaxDepth int
	// MaxErrors is the most errors reported; more are summarized in one
	// last error. Default 100.
	MaxErrors int
}

// Default limits.
const (
	DefaultMaxFileBytes   = 4 << 20
	DefaultMaxFiles       = 1000
	DefaultMaxRules       = 50000
	DefaultMaxPublishers  = 100
	DefaultMaxConditions  = 64
	DefaultMaxValues      = 1000
	DefaultMaxStringBytes = 1024
	DefaultMaxDepth       = 16
	DefaultMaxErrors      = 100
)

func (l *Limits) setDefaults() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	if l.MaxFileBytes <= 0 {
		l.MaxFileBytes = DefaultMaxFileBytes
	}
	def(&l.MaxFiles, DefaultMaxFiles)
	def(&l.MaxRules, DefaultMaxRules)
	def(&l.MaxPublishers, DefaultMaxPublishers)
	def(&l.MaxConditions, DefaultMaxConditions)
	def(&l.MaxValues, DefaultMaxValues)
	def(&l.MaxStringBytes, DefaultMaxStringBytes)
	def(&l.MaxDepth, DefaultMaxDepth)
	def(&l.MaxErrors, DefaultMaxErrors)
}

// LoadOptions tune Load. A nil *LoadOptions means the zero value.
type LoadOptions struct {
	// KnownPublishers reports whether a publisher key is registered (for
	// instance the bus registry's lookup). Every Key in the policy is
	// checked against it. Nil: keys are not checked.
	KnownPublishers func(key string) bool
	// Limits against hostile files; zero fields take the defaults.
	Limits Limits
}

// Source is a policy file held in memory.
type Source struct {
	Name string
	Data []byte
}

// Load reads a policy from files and directories and compiles it. A
// directory contributes every *.json file directly inside it whose name does
// not start with ".", in lexical order; files are read in the order given.
// On any problem Load returns nil and every error found, joined with
// errors.Join; each is a *RuleError.
func Load(paths []string, opts *LoadOptions) (*Policy, error) {
	o := loadOptions(opts)
	files, err := ExpandPaths(paths)
	if err != nil {
		return nil, err
	}
	if len(files) > o.Limits.MaxFiles {
		return nil, &RuleError{File: files[o.Limits.MaxFiles], Rule: -1,
			Err: detail(ErrLimit, "more than %d files", o.Limits.MaxFiles)}
	}
	var errs []error
	srcs := make([]Source, 0, len(files))
	for _, f := range files {
		data, err := readLimited(f, o.Limits.MaxFileBytes)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		srcs = append(srcs, Source{Name: f, Data: data})
	}
	p, err := loadSources(srcs, &o)
	if len(errs) > 0 {
		return nil, errors.Join(append(errs, err)...)
	}
	return p, err
}

func readLimited(name string, max int64) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, &RuleError{File: name, Rule: -1, Err: fmt.Errorf("%w: %w", ErrRead, err)}
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, &RuleError{File: name, Rule: -1, Err: fmt.Errorf("%w: %w", ErrRead, err)}
	}
	if int64(len(data)) > max {
		return nil, &RuleError{File: name, Rule: -1, Err: detail(ErrLimit, "file larger than %d bytes", max)}
	}
	return data, nil
}

// ExpandPaths lists the files Load reads for paths, in load order: a file as
// given, a directory as its *.json files (not hidden, not recursive, symlinks
// followed) in lexical order. A file named twice is read once, at its first
// place.
func ExpandPaths(paths []string) ([]string, error) {
	var files []string
	var errs []error
	seen := map[string]bool{}
	add := func(f string) {
		c := filepath.Clean(f)
		if !seen[c] {
			seen[c] = true
			files = append(files, f)
		}
	}
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			errs = append(errs, &RuleError{File: p, Rule: -1, Err: fmt.Errorf("%w: %w", ErrRead, err)})
			continue
		}
		if !st.IsDir() {
			add(p)
			continue
		}
		entries, err := os.ReadDir(p)
		if err != nil {
			errs = append(errs, &RuleError{File: p, Rule: -1, Err: fmt.Errorf("%w: %w", ErrRead, err)})
			continue
		}
		n := 0
		for _, e := range entries {
			name := e.Name()
			if strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".json") {
				continue
			}
			full := filepath.Join(p, name)
			if fst, err := os.Stat(full); err != nil || !fst.Mode().IsRegular() {
				continue
			}
			add(full)
			n++
		}
		if n == 0 {
			errs = append(errs, &RuleError{File: p, Rule: -1, Err: detail(ErrNoFiles, "directory has no *.json file")})
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if len(files) == 0 {
		return nil, &RuleError{Rule: -1, Err: ErrNoFiles}
	}
	return files, nil
}

// LoadSources compiles a policy from files held in memory, in the order
// given, exactly as Load does from disk.
func LoadSources(srcs []Source, opts *LoadOptions) (*Policy, error) {
	o := loadOptions(opts)
	if len(srcs) == 0 {
		return nil, &RuleError{Rule: -1, Err: ErrNoFiles}
	}
	if len(srcs) > o.Limits.MaxFiles {
		return nil, &RuleError{File: srcs[o.Limits.MaxFiles].Name, Rule: -1,
			Err: detail(ErrLimit, "more than %d files", o.Limits.MaxFiles)}
	}
	return loadSources(srcs, &o)
}

// Parse compiles a policy from one JSON document; name is used in errors.
func Parse(name string, data []byte, opts *LoadOptions) (*Policy, error) {
	return LoadSources([]Source{{Name: name, Data: data}}, opts)
}

func loadOptions(opts *LoadOptions) LoadOptions {
	var o LoadOptions
	if opts != nil {
		o = *opts
	}
	o.Limits.setDefaults()
	return o
}

func loadSources(srcs []Source, o *LoadOptions) (*Policy, error) {
	el := &errList{max: o.Limits.MaxErrors}
	var files []*rawFile
	total := 0
	for _, s := range srcs {
		if int64(len(s.Data)) > o.Limits.MaxFileBytes {
			el.add(&RuleError{File: s.Name, Rule: -1, Err: detail(ErrLimit, "file larger than %d bytes", o.Limits.MaxFileBytes)})
			continue
		}
		data := s.Data
		if bytes.HasPrefix(data, utf8BOM) {
			// Windows editors (and .NET's appsettings.json) start files with
			// a byte order mark; blank it so that columns stay byte counts.
			data = append([]byte("   "), data[len(utf8BOM):]...)
		}
		fp := &fileParser{name: s.Name, data: data, opts: o, errs: el, rule: -1, total: &total}
		files = append(files, fp.parse())
	}
	p := compile(files, el)
	if err := el.err(); err != nil {
		return nil, err
	}
	return p, nil
}

var utf8BOM = []byte{0xEF, 0xBB, 0xBF}

// errList collects errors up to a maximum.
type errList struct {
	errs    []error
	max     int
	dropped int
}

func (l *errList) add(e *RuleError) {
	if len(l.errs) >= l.max {
		l.dropped++
		return
	}
	l.errs = append(l.errs, e)
}

func (l *errList) err() error {
	if len(l.errs) == 0 {
		return nil
	}
	errs := l.errs
	if l.dropped > 0 {
		errs = append(errs[:len(errs):len(errs)], fmt.Errorf("policy: %d more errors not shown", l.dropped))
	}
	return errors.Join(errs...)
}

// Raw, uncompiled forms.
type rawRoute struct {
	Route
	pos Position
}

type rawCond struct {
	attr, key string
	values    []string
	pos       Position
}

type rawRule struct {
	name     string
	namePos  Position
	priority int
	match    []rawCond
	routes   []rawRoute
	cont     bool
	pos      Position
	index    int
	ok       bool // no error inside the rule
	has      map[string]bool
}

type rawFile struct {
	name       string
	def        []rawRoute
	hasDefault bool
	defPos     Position
	rules      []*rawRule
}

// errAbort stops parsing a file after a syntax error or a hard limit.
var errAbort = errors.New("abort")

type fileParser struct {
	name    string
	data    []byte
	dec     *json.Decoder
	opts    *LoadOptions
	errs    *errList
	lines   []int
	rule    int // index of the rule being parsed, -1 outside rules
	total   *int
	depth   int
	cur     *rawRule
	result  *rawFile
	pending *pushed
}

func (p *fileParser) parse() *rawFile {
	p.result = &rawFile{name: p.name}
	// JSON text is UTF-8 (RFC 8259). encoding/json would turn invalid bytes
	// into U+FFFD silently, making a value that matches something else than
	// what the file says: reject the file, pointing at the first bad byte.
	if !utf8.Valid(p.data) {
		off := 0
		for off < len(p.data) {
			r, size := utf8.DecodeRune(p.data[off:])
			if r == utf8.RuneError && size <= 1 {
				break
			}
			off += size
		}
		p.fail(off, "", detail(ErrSyntax, "invalid UTF-8 (byte 0x%02x): policy files must be UTF-8", p.data[off]))
		return p.result
	}
	p.dec = json.NewDecoder(bytes.NewReader(p.data))
	p.dec.UseNumber()
	_ = p.top()
	return p.result
}

func (p *fileParser) pos(off int) Position {
	if p.lines == nil {
		p.lines = []int{0}
		for i, c := range p.data {
			if c == '\n' {
				p.lines = append(p.lines, i+1)
			}
		}
	}
	if off > len(p.data) {
		off = len(p.data)
	}
	// last line start <= off
	lo, hi := 0, len(p.lines)-1
	for lo < hi {
		mid := (lo + hi + 1) / 2
		if p.lines[mid] <= off {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	return Position{File: p.name, Line: lo + 1, Col: off - p.lines[lo] + 1}
}

func (p *fileParser) fail(off int, field string, err error) {
	e := &RuleError{File: p.name, Rule: p.rule, Field: field, Err: err}
	if off >= 0 {
		pos := p.pos(off)
		e.Line, e.Col = pos.Line, pos.Col
	}
	if p.cur != nil {
		p.cur.ok = false
	}
	p.errs.add(e)
}

// next returns the next token and the offset where it starts. A syntax error
// is reported and turned into errAbort; the end of input is io.EOF.
func (p *fileParser) next() (json.Token, int, error) {
	off := int(p.dec.InputOffset())
	off = skipSpace(p.data, off)
	if off < len(p.data) && (p.data[off] == ',' || p.data[off] == ':') {
		off = skipSpace(p.data, off+1)
	}
	tok, err := p.dec.Token()
	if err == nil {
		return tok, off, nil
	}
	if err == io.EOF {
		return nil, off, io.EOF
	}
	var se *json.SyntaxError
	switch {
	case errors.As(err, &se):
		at := int(se.Offset) - 1
		if at < off {
			at = off
		}
		p.fail(at, "", detail(ErrSyntax, "%s", se.Error()))
	case errors.Is(err, io.ErrUnexpectedEOF):
		p.fail(len(p.data), "", detail(ErrSyntax, "unexpected end of input"))
	default:
		p.fail(off, "", detail(ErrSyntax, "%s", err.Error()))
	}
	return nil, off, errAbort
}

// must is next where the end of input is a syntax error.
func (p *fileParser) must() (json.Token, int, error) {
	tok, off, err := p.next()
	if err == io.EOF {
		p.fail(len(p.data), "", detail(ErrSyntax, "unexpected end of input"))
		return nil, off, errAbort
	}
	return tok, off, err
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skip consumes the rest of a value whose first token is tok.
func (p *fileParser) skip(tok json.Token, off int) error {
	d, ok := tok.(json.Delim)
	if !ok || (d != '{' && d != '[') {
		return nil
	}
	depth := p.depth + 1
	for depth > p.depth {
		if depth > p.opts.Limits.MaxDepth {
			p.fail(off, "", detail(ErrLimit, "nesting deeper than %d", p.opts.Limits.MaxDepth))
			return errAbort
		}
		t, o, err := p.must()
		if err != nil {
			return err
		}
		off = o
		if d, ok := t.(json.Delim); ok {
			switch d {
			case '{', '[':
				depth++
			default:
				depth--
			}
		}
	}
	return nil
}

func typeName(tok json.Token) string {
	switch t := tok.(type) {
	case json.Delim:
		if t == '{' {
			return "an object"
		}
		return "a list"
	case string:
		return "a string"
	case json.Number:
		return "a number"
	case bool:
		return "a boolean"
	case nil:
		return "null"
	}
	return "a value"
}

// wrongType reports tok as the wrong type and skips it.
func (p *fileParser) wrongType(tok json.Token, off int, field, want string) error {
	p.fail(off, field, detail(ErrType, "want %s, got %s", want, typeName(tok)))
	return p.skip(tok, off)
}

// object parses an object whose '{' was just read, calling fn for each key
// with the key's offset; fn must consume the value. Duplicate keys (after
// canon) are reported here.
func (p *fileParser) object(field string, canon func(string) string, fn func(key string, keyOff int) error) error {
	p.depth++
	defer func() { p.depth-- }()
	if p.depth > p.opts.Limits.MaxDepth {
		p.fail(-1, field, detail(ErrLimit, "nesting deeper than %d", p.opts.Limits.MaxDepth))
		return errAbort
	}
	seen := map[string]bool{}
	for {
		tok, off, err := p.must()
		if err != nil {
			return err
		}
		if d, ok := tok.(json.Delim); ok && d == '}' {
			return nil
		}
		key, _ := tok.(string)
		c := key
		if canon != nil {
			c = canon(key)
		}
		if c != "" && seen[c] {
			p.fail(off, join(field, key), detail(ErrDuplicateField, "%q given twice", c))
			t, o, err := p.must()
			if err != nil {
				return err
			}
			if err := p.skip(t, o); err != nil {
				return err
			}
			continue
		}
		seen[c] = true
		if err := fn(key, off); err != nil {
			return err
		}
	}
}

// list parses a list whose '[' was just read, calling fn for each element.
func (p *fileParser) list(field string, max int, what string, fn func(i int, tok json.Token, off int) error) (int, error) {
	p.depth++
	defer func() { p.depth-- }()
	if p.depth > p.opts.Limits.MaxDepth {
		p.fail(-1, field, detail(ErrLimit, "nesting deeper than %d", p.opts.Limits.MaxDepth))
		return 0, errAbort
	}
	for i := 0; ; i++ {
		tok, off, err := p.must()
		if err != nil {
			return i, err
		}
		if d, ok := tok.(json.Delim); ok && d == ']' {
			return i, nil
		}
		if i >= max {
			p.fail(off, field, detail(ErrLimit, "more than %d %s", max, what))
			return i, errAbort
		}
		if err := fn(i, tok, off); err != nil {
			return i, err
		}
	}
}

func join(field, key string) string {
	if field == "" {
		return key
	}
	return field + "." + key
}

func idx(field string, i int) string { return field + "[" + strconv.Itoa(i) + "]" }

// fieldNames maps each accepted spelling to its canonical name.
var (
	topFields = map[string]string{
		"Default": "Default", "default": "Default",
		"Rules": "Rules", "rules": "Rules",
		"PublishingPolicies": "PublishingPolicies", "publishingPolicies": "PublishingPolicies",
	}
	ruleFields = map[string]string{
		"Name": "Name", "name": "Name",
		"Priority": "Priority", "priority": "Priority",
		"Match": "Match", "match": "Match",
		"Publishers": "Publishers", "publishers": "Publishers",
		"Continue": "Continue", "continue": "Continue",
	}
	defaultFields = map[string]string{"Publishers": "Publishers", "publishers": "Publishers"}
	routeFields   = map[string]string{
		"Key": "Key", "key": "Key",
		"Destination": "Destination", "destination": "Destination",
	}
	// matchAttrs maps the named attributes to their metadata keys.
	matchAttrs = map[string][2]string{
		"Event": {"Event", tailrace.MetaKind}, "event": {"Event", tailrace.MetaKind},
		"Domain": {"Domain", tailrace.MetaDomain}, "domain": {"Domain", tailrace.MetaDomain},
		"TenantTier": {"TenantTier", tailrace.MetaTenantTier}, "tenantTier": {"TenantTier", tailrace.MetaTenantTier},
	}
)

func canonOf(m map[string]string) func(string) string {
	return func(k string) string {
		if c, ok := m[k]; ok {
			return c
		}
		return k
	}
}

// suggest returns the canonical field name of m closest to key — at most
// two edits (insertions, deletions, substitutions or swaps of neighbours,
// ignoring case) and fewer than half of key's letters — or "" when none is
// that close. Ties go to the alphabetically first name.
func suggest(key string, m map[string]string) string {
	best, bestD := "", 3
	if len(key) > 64 {
		return ""
	}
	for _, c := range m {
		d := editDistance(strings.ToLower(key), strings.ToLower(c))
		if d == 0 || d*2 >= len(key) {
			continue // the name itself (misplaced, not misspelt), or too far
		}
		if d < bestD || (d == bestD && c < best) {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance between a and b:
// insertions, deletions, substitutions and transpositions of adjacent
// bytes each cost one.
func editDistance(a, b string) int {
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}

func (p *fileParser) unknown(tok json.Token, off int, field, key string, m map[string]string) error {
	msg := fmt.Sprintf("%q", key)
	cased := false
	for k, c := range m {
		if strings.EqualFold(k, key) && k == c && k != key {
			msg += fmt.Sprintf(" (names are case-sensitive: %q or %q)", c, strings.ToLower(c[:1])+c[1:])
			cased = true
			break
		}
	}
	if s := suggest(key, m); !cased && s != "" {
		msg += fmt.Sprintf(" (did you mean %q?)", s)
	}
	p.fail(off, join(field, key), detail(ErrUnknownField, "%s", msg))
	t, o, err := p.must()
	if err != nil {
		return err
	}
	return p.skip(t, o)
}

func (p *fileParser) top() error {
	tok, off, err := p.next()
	if err == io.EOF {
		p.fail(-1, "", detail(ErrEmpty, "file is empty"))
		return err
	}
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		p.fail(off, "", detail(ErrType, "a policy is a JSON object, got %s", typeName(tok)))
		return errAbort
	}
	if err := p.body("", off, true); err != nil {
		return err
	}
	_, off, err = p.next()
	if err == io.EOF {
		return nil
	}
	if err == nil {
		p.fail(off, "", detail(ErrSyntax, "data after the policy object"))
	}
	return errAbort
}

// body parses a policy object whose '{' was just read.
func (p *fileParser) body(field string, objOff int, top bool) error {
	nkeys, wrapped := 0, false
	err := p.object(field, canonOf(topFields), func(key string, off int) error {
		nkeys++
		c, ok := topFields[key]
		if !ok || (c == "PublishingPolicies" && !top) {
			return p.unknown(nil, off, field, key, topFields)
		}
		tok, voff, err := p.must()
		if err != nil {
			return err
		}
		switch c {
		case "PublishingPolicies":
			wrapped = true
			if d, ok := tok.(json.Delim); !ok || d != '{' {
				return p.wrongType(tok, voff, key, "an object")
			}
			return p.body(key, voff, false)
		case "Default":
			p.result.hasDefault = true
			p.result.defPos = p.pos(voff)
			if d, ok := tok.(json.Delim); !ok || d != '{' {
				return p.wrongType(tok, voff, join(field, key), "an object")
			}
			f := join(field, "Default")
			hasPubs := false
			err := p.object(f, canonOf(defaultFields), func(k string, koff int) error {
				if _, ok := defaultFields[k]; !ok {
					return p.unknown(nil, koff, f, k, defaultFields)
				}
				hasPubs = true
				routes, err := p.routes(join(f, "Publishers"))
				p.result.def = routes
				return err
			})
			if err == nil && !hasPubs {
				p.fail(voff, f, detail(ErrMissing, "Publishers is required"))
			}
			return err
		case "Rules":
			f := join(field, "Rules")
			if d, ok := tok.(json.Delim); !ok || d != '[' {
				return p.wrongType(tok, voff, f, "a list")
			}
			_, err := p.list(f, math.MaxInt, "rules", func(i int, tok json.Token, off int) error {
				*p.total++
				if *p.total > p.opts.Limits.MaxRules {
					p.fail(off, f, detail(ErrLimit, "more than %d rules", p.opts.Limits.MaxRules))
					return errAbort
				}
				return p.parseRule(i, tok, off)
			})
			return err
		}
		return nil
	})
	if err == nil && wrapped && nkeys > 1 {
		p.fail(objOff, field, detail(ErrUnknownField, "a file that uses the PublishingPolicies wrapper must have no other top-level key"))
	}
	return err
}

func (p *fileParser) parseRule(i int, tok json.Token, off int) error {
	p.rule = i
	defer func() { p.rule, p.cur = -1, nil }()
	r := &rawRule{index: i, pos: p.pos(off), ok: true, has: map[string]bool{}}
	p.cur = r
	p.result.rules = append(p.result.rules, r)
	first := len(p.errs.errs)
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return p.wrongType(tok, off, "", "a rule object")
	}
	err := p.object("", canonOf(ruleFields), func(key string, koff int) error {
		c, ok := ruleFields[key]
		if !ok {
			return p.unknown(nil, koff, "", key, ruleFields)
		}
		r.has[c] = true
		tok, voff, err := p.must()
		if err != nil {
			return err
		}
		switch c {
		case "Name":
			s, ok := tok.(string)
			if !ok {
				return p.wrongType(tok, voff, c, "a string")
			}
			r.name, r.namePos = s, p.pos(voff)
			if err := checkName(s, p.opts.Limits.MaxStringBytes); err != nil {
				p.fail(voff, c, err)
			}
		case "Priority":
			n, ok := tok.(json.Number)
			if !ok {
				return p.wrongType(tok, voff, c, "an integer")
			}
			v, err := strconv.ParseInt(string(n), 10, 32)
			if err != nil {
				p.fail(voff, c, detail(ErrBadNumber, "%s is not an integer from %d to %d", n, math.MinInt32, math.MaxInt32))
			}
			r.priority = int(v)
		case "Continue":
			b, ok := tok.(bool)
			if !ok {
				return p.wrongType(tok, voff, c, "true or false")
			}
			r.cont = b
		case "Match":
			if d, ok := tok.(json.Delim); !ok || d != '{' {
				return p.wrongType(tok, voff, c, "an object")
			}
			return p.parseMatch(r)
		case "Publishers":
			p.pushBack(tok, voff)
			routes, err := p.routes(c)
			r.routes = routes
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, f := range []string{"Priority", "Match", "Publishers"} {
		if !r.has[f] {
			hint := ""
			if f == "Match" {
				hint = " (write {} to match every message)"
			}
			p.fail(off, "", detail(ErrMissing, "%s is required%s", f, hint))
		}
	}
	if r.name != "" {
		for _, e := range p.errs.errs[first:] {
			if re, ok := e.(*RuleError); ok && re.Rule == i && re.File == p.name && re.Name == "" {
				re.Name = r.name
			}
		}
	}
	return nil
}

// pushed lets routes() receive a token already read.
type pushed struct {
	tok json.Token
	off int
}

func (p *fileParser) pushBack(tok json.Token, off int) { p.pending = &pushed{tok, off} }

func (p *fileParser) take() (json.Token, int, error) {
	if p.pending != nil {
		t := p.pending
		p.pending = nil
		return t.tok, t.off, nil
	}
	return p.must()
}

func checkName(s string, max int) error {
	switch {
	case s == "":
		return detail(ErrEmpty, "Name must not be empty (leave it out instead)")
	case len(s) > max:
		return detail(ErrLimit, "Name longer than %d bytes", max)
	case s == "default":
		return detail(ErrBadName, "%q is reserved for the Default", s)
	}
	for i, c := range s {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			i > 0 && (c == '.' || c == '_' || c == '-' || c == ':' || c == '/')
		if !ok {
			return detail(ErrBadName, "%q: a name is a letter or digit followed by letters, digits and . _ - : /", s)
		}
	}
	return nil
}

// routes parses a list of publishers.
func (p *fileParser) routes(field string) ([]rawRoute, error) {
	tok, off, err := p.take()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, p.wrongType(tok, off, field, "a list of publishers")
	}
	var out []rawRoute
	n, err := p.list(field, p.opts.Limits.MaxPublishers, "publishers", func(i int, tok json.Token, eoff int) error {
		f := idx(field, i)
		if d, ok := tok.(json.Delim); !ok || d != '{' {
			return p.wrongType(tok, eoff, f, "a publisher object")
		}
		rt := rawRoute{pos: p.pos(eoff)}
		var has [2]bool
		err := p.object(f, canonOf(routeFields), func(key string, koff int) error {
			c, ok := routeFields[key]
			if !ok {
				return p.unknown(nil, koff, f, key, routeFields)
			}
			tok, voff, err := p.must()
			if err != nil {
				return err
			}
			s, ok := tok.(string)
			if !ok {
				return p.wrongType(tok, voff, join(f, c), "a string")
			}
			switch {
			case s == "":
				p.fail(voff, join(f, c), detail(ErrEmpty, "%s must not be empty", c))
			case len(s) > p.opts.Limits.MaxStringBytes:
				p.fail(voff, join(f, c), detail(ErrLimit, "%s longer than %d bytes", c, p.opts.Limits.MaxStringBytes))
			case !utf8.ValidString(s):
				p.fail(voff, join(f, c), detail(ErrType, "%s is not valid UTF-8", c))
			case c == "Key" && p.opts.KnownPublishers != nil && !p.opts.KnownPublishers(s):
				p.fail(voff, join(f, c), detail(ErrUnknownPublisher, "%q is not a registered publisher", s))
			}
			if c == "Key" {
				rt.Key, has[0] = s, true
			} else {
				rt.Destination, has[1] = s, true
			}
			return nil
		})
		if err != nil {
			return err
		}
		if !has[0] {
			p.fail(eoff, f, detail(ErrMissing, "Key is required"))
		}
		if !has[1] {
			p.fail(eoff, f, detail(ErrMissing, "Destination is required"))
		}
		if has[0] && has[1] {
			for _, o := range out {
				if o.Route == rt.Route {
					p.fail(eoff, f, detail(ErrDuplicateRoute, "%s -> %s is listed twice", rt.Key, rt.Destination))
					return nil
				}
			}
			out = append(out, rt)
		}
		return nil
	})
	if err == nil && n == 0 {
		p.fail(off, field, detail(ErrEmpty, "Publishers must list at least one publisher"))
	}
	return out, err
}

func (p *fileParser) parseMatch(r *rawRule) error {
	byKey := map[string]string{} // metadata key -> attr that set it
	n := 0
	return p.object("Match", nil, func(key string, koff int) error {
		n++
		f := join("Match", key)
		if n > p.opts.Limits.MaxConditions {
			p.fail(koff, "Match", detail(ErrLimit, "more than %d conditions", p.opts.Limits.MaxConditions))
			return errAbort
		}
		attr, mkey := key, key
		if a, ok := matchAttrs[key]; ok {
			attr, mkey = a[0], a[1]
		} else {
			for k := range matchAttrs {
				if strings.EqualFold(k, key) {
					return p.unknown(nil, koff, "Match", key, map[string]string{matchAttrs[k][0]: matchAttrs[k][0]})
				}
			}
			switch {
			case key == "":
				p.fail(koff, "Match", detail(ErrEmpty, "a metadata key must not be empty"))
			case len(key) > p.opts.Limits.MaxStringBytes:
				p.fail(koff, "Match", detail(ErrLimit, "key longer than %d bytes", p.opts.Limits.MaxStringBytes))
			}
		}
		if prev, dup := byKey[mkey]; dup {
			p.fail(koff, f, detail(ErrDuplicateCondition, "%s and %s both test metadata %q", prev, key, mkey))
		}
		byKey[mkey] = key
		c := rawCond{attr: attr, key: mkey, pos: p.pos(koff)}
		tok, voff, err := p.must()
		if err != nil {
			return err
		}
		addValue := func(s string, off int, vf string) {
			switch {
			case s == "":
				p.fail(off, vf, detail(ErrEmpty, "an empty value never matches (an absent or empty attribute does not match; use \"*\" for any value)"))
				return
			case len(s) > p.opts.Limits.MaxStringBytes:
				p.fail(off, vf, detail(ErrLimit, "value longer than %d bytes", p.opts.Limits.MaxStringBytes))
				return
			}
			if isGlob(s) {
				if _, err := path.Match(s, ""); err != nil {
					p.fail(off, vf, detail(ErrBadGlob, "%q: %v", s, err))
					return
				}
			}
			c.values = append(c.values, s)
		}
		switch t := tok.(type) {
		case string:
			addValue(t, voff, f)
		case json.Delim:
			if t != '[' {
				return p.wrongType(tok, voff, f, "a string or a list of strings")
			}
			n, err := p.list(f, p.opts.Limits.MaxValues, "values", func(i int, tok json.Token, eoff int) error {
				s, ok := tok.(string)
				if !ok {
					return p.wrongType(tok, eoff, idx(f, i), "a string")
				}
				addValue(s, eoff, idx(f, i))
				return nil
			})
			if err != nil {
				return err
			}
			if n == 0 {
				p.fail(voff, f, detail(ErrEmpty, "an empty list never matches"))
			}
		default:
			return p.wrongType(tok, voff, f, "a string or a list of strings")
		}
		r.match = append(r.match, c)
		return nil
	})
}

// isGlob reports whether s uses glob syntax (path.Match): * ? [ or \.
func isGlob(s string) bool { return strings.ContainsAny(s, `*?[\`) }
