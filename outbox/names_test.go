package outbox

import (
	"errors"
	"strings"
	"testing"
)

func TestValidateTableName(t *testing.T) {
	valid := []string{"outbox", "tailrace_outbox", "_x", "a1", strings.Repeat("a", MaxTableNameLen)}
	for _, n := range valid {
		if err := ValidateTableName(n); err != nil {
			t.Errorf("ValidateTableName(%q) = %v, want nil", n, err)
		}
	}
	invalid := []string{
		"", "Outbox", "1outbox", "out-box", "out.box", "out box", `o"; DROP TABLE x; --`,
		"outbox`", "ü", strings.Repeat("a", MaxTableNameLen+1),
		// 63-byte names that PostgreSQL would keep but whose derived names it
		// would truncate onto each other.
		strings.Repeat("a", 62) + "b", strings.Repeat("a", 62) + "c",
	}
	for _, n := range invalid {
		err := ValidateTableName(n)
		if !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidateTableName(%q) = %v, want ErrInvalidName", n, err)
		}
	}
}

func FuzzValidateTableName(f *testing.F) {
	for _, s := range []string{"outbox", "Out", "a-b", "", "x;y"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if ValidateTableName(name) != nil {
			return
		}
		// Whatever is accepted must be safe to splice into SQL unquoted and
		// leave room for the derived names.
		if len(name) == 0 || len(name)+8 > 63 {
			t.Fatalf("accepted %q of length %d", name, len(name))
		}
		for _, c := range name {
			if !(c == '_' || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) {
				t.Fatalf("accepted %q with %q", name, c)
			}
		}
	})
}
