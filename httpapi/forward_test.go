package httpapi

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

func TestCanonicalPath(t *testing.T) {
	for _, c := range []struct {
		in, want string
		ok       bool
	}{
		{"/v4/profile/portrait_get", "/v4/profile/portrait_get", true},
		{"//v4/profile/portrait_get", "/v4/profile/portrait_get", true},
		{"/v4/profile/portrait_get/", "/v4/profile/portrait_get", true},
		{"/v4///openim//sendmsg//", "/v4/openim/sendmsg", true},
		{"/", "/", true},
		{"//", "/", true},
		{"/v4/.well-known/x", "/v4/.well-known/x", true},
		{"/v4/../profile/portrait_get", "", false},
		{"/v4/./openim/sendmsg", "", false},
		{"/v4/openim/..", "", false},
		{"v4/openim/sendmsg", "", false},
	} {
		got, ok := canonicalPath(c.in)
		if ok != c.ok || (ok && got != c.want) {
			t.Errorf("canonicalPath(%q) = %q, %v; want %q, %v", c.in, got, ok, c.want, c.ok)
		}
	}
	for _, c := range []struct {
		in string
		ok bool
	}{
		{"/v4/openim/sendmsg", true}, {"/v4/ConfigSvc/GetConfig", true}, {"/v4/openim", false}, {"/v4/a/b/c", false},
		{"/v4/a-b/c", false}, {"/v4//c", false}, {"/v5/a/b", false}, {"/v4/a/" + strings.Repeat("x", 65), false},
	} {
		if _, _, ok := apiPath(c.in); ok != c.ok {
			t.Errorf("apiPath(%q) = %v", c.in, ok)
		}
	}
}

// Account calls are read within bounds: ids the cache could not hold are
// skipped, repeats counted once, and a body naming more accounts than the
// upstream takes is not read at all.
func TestReadLifecycle(t *testing.T) {
	if lc := readLifecycle(pathAccountImport, []byte(`{"Identifier":"old","Nick":"x"}`)); lc == nil || len(lc.accounts) != 1 || lc.accounts[0] != "old" {
		t.Fatalf("%+v", lc)
	}
	lc := readLifecycle(pathMultiAccountImport, []byte(`{"Accounts":["a","a",7,"`+strings.Repeat("x", 33)+`"],"AccountList":[{"UserID":"b"},{"UserID":{}}]}`))
	if lc == nil || fmt.Sprint(lc.accounts) != "[a b]" {
		t.Fatalf("%+v", lc)
	}
	if lc := readLifecycle(pathAccountDelete, []byte(`{"DeleteItem":"nope"}`)); lc != nil {
		t.Fatalf("%+v", lc)
	}
	items := make([]map[string]string, maxLifecycleAccounts+1)
	for i := range items {
		items[i] = map[string]string{"UserID": fmt.Sprint("u", i)}
	}
	big, _ := json.Marshal(map[string]any{"DeleteItem": items})
	if lc := readLifecycle(pathAccountDelete, big); lc != nil {
		t.Fatalf("%d accounts read", len(lc.accounts))
	}
	if lc := readLifecycle("/v4/openim/sendmsg", []byte(`{"UserID":"a"}`)); lc != nil {
		t.Fatal("read a call that is not an account call")
	}
}
