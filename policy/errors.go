package policy

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Sentinel errors. Every load error is a *RuleError wrapping one of these, so
// callers can test the kind of a problem with errors.Is and find its place
// with errors.As.
var (
	// ErrSyntax: the file is not valid JSON.
	ErrSyntax = errors.New("syntax error")
	// ErrUnknownField: an object has a key the format does not define.
	ErrUnknownField = errors.New("unknown field")
	// ErrDuplicateField: an object has the same key twice.
	ErrDuplicateField = errors.New("duplicate field")
	// ErrType: a value has the wrong JSON type.
	ErrType = errors.New("wrong type")
	// ErrMissing: a required field is absent.
	ErrMissing = errors.New("missing field")
	// ErrEmpty: a string, list or object that must not be empty is empty.
	ErrEmpty = errors.New("empty value")
	// ErrBadGlob: a Match value is not a valid glob pattern.
	ErrBadGlob = errors.New("invalid glob")
	// ErrBadName: a rule Name is not allowed.
	ErrBadName = errors.New("invalid rule name")
	// ErrDuplicateName: two rules share a Name.
	ErrDuplicateName = errors.New("duplicate rule name")
	// ErrDuplicateDefault: more than one file defines Default.
	ErrDuplicateDefault = errors.New("duplicate Default")
	// ErrDuplicateCondition: two Match keys name the same attribute.
	ErrDuplicateCondition = errors.New("duplicate condition")
	// ErrDuplicateRoute: a publisher list has the same (Key, Destination) twice.
	ErrDuplicateRoute = errors.New("duplicate publisher")
	// ErrUnknownPublisher: a publisher Key is not registered.
	ErrUnknownPublisher = errors.New("unknown publisher")
	// ErrBadNumber: Priority is not an integer in range.
	ErrBadNumber = errors.New("invalid number")
	// ErrLimit: a file exceeds one of the Limits.
	ErrLimit = errors.New("limit exceeded")
	// ErrNoFiles: the paths given to Load name no policy file.
	ErrNoFiles = errors.New("no policy files")
	// ErrRead: a file or directory could not be read.
	ErrRead = errors.New("read error")

	// ErrNoRoute is returned by Resolve when no rule matches and the policy
	// has no Default. The message must not be acknowledged as delivered.
	ErrNoRoute = errors.New("policy: no route")
)

// RuleError is one problem found while loading a policy: where it is and what
// is wrong. Load returns all of them at once, joined with errors.Join.
type RuleError struct {
	// File is the file name as given to Load (or the Source name).
	File string
	// Line and Col locate the offending JSON value, 1-based; Col counts
	// bytes. Both are 0 when the problem has no single place.
	Line, Col int
	// Rule is the index of the rule within its file's Rules list, or -1
	// when the problem is outside any rule (Default, the top level).
	Rule int
	// Name is the rule's Name when it has one.
	Name string
	// Field is the path of the offending field, e.g. "Publishers[1].Key".
	Field string
	// Err is the problem: one of the Err* sentinels, wrapped with detail.
	Err error
}

func (e *RuleError) Error() string {
	var b strings.Builder
	b.WriteString("policy: ")
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteString(":" + strconv.Itoa(e.Line) + ":" + strconv.Itoa(e.Col))
	}
	b.WriteString(": ")
	if e.Rule >= 0 {
		b.WriteString("rule " + strconv.Itoa(e.Rule))
		if e.Name != "" {
			b.WriteString(" " + strconv.Quote(e.Name))
		}
		b.WriteString(": ")
	}
	if e.Field != "" {
		b.WriteString(e.Field + ": ")
	}
	b.WriteString(e.Err.Error())
	return b.String()
}

func (e *RuleError) Unwrap() error { return e.Err }

// detail wraps a sentinel with a message: errors.Is(detail(ErrX, ...), ErrX).
func detail(sentinel error, format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{sentinel}, args...)...)
}
