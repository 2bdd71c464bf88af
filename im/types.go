package im

import "encoding/json"

// GetRequest is the body of v4/profile/portrait_get.
type GetRequest struct {
	ToAccount []string `json:"To_Account"`
	TagList   []string `json:"TagList"`
}

// ProfileItem is one tag and its value. Value keeps the exact JSON the
// upstream sent (a uint64 stays exact, a string stays a string).
type ProfileItem struct {
	Tag   string          `json:"Tag"`
	Value json.RawMessage `json:"Value"`
}

// UserProfile is one account's result in a portrait_get answer.
type UserProfile struct {
	ToAccount   string        `json:"To_Account"`
	ProfileItem []ProfileItem `json:"ProfileItem"`
	ResultCode  int           `json:"ResultCode"`
	ResultInfo  string        `json:"ResultInfo"`
}

// GetResponse is the answer of v4/profile/portrait_get, and the error
// envelope of every IM REST API call (only the last four fields set).
type GetResponse struct {
	UserProfileItem []UserProfile `json:"UserProfileItem,omitempty"`
	FailAccount     []string      `json:"Fail_Account,omitempty"`
	InvalidAccount  []string      `json:"Invalid_Account,omitempty"`
	ActionStatus    string        `json:"ActionStatus"`
	ErrorCode       int           `json:"ErrorCode"`
	ErrorInfo       string        `json:"ErrorInfo"`
	ErrorDisplay    string        `json:"ErrorDisplay"`
}

// SetRequest is the body of v4/profile/portrait_set.
type SetRequest struct {
	FromAccount string        `json:"From_Account"`
	ProfileItem []ProfileItem `json:"ProfileItem"`
}

// Envelope is the bare IM answer: the status fields every call returns.
type Envelope struct {
	ActionStatus string `json:"ActionStatus"`
	ErrorCode    int    `json:"ErrorCode"`
	ErrorInfo    string `json:"ErrorInfo"`
	ErrorDisplay string `json:"ErrorDisplay,omitempty"`
}

// Status values of ActionStatus.
const (
	StatusOK   = "OK"
	StatusFail = "FAIL"
)

// Paths of the profile calls, relative to the base URL.
const (
	PathGet = "/v4/profile/portrait_get"
	PathSet = "/v4/profile/portrait_set"
)

// MaxAccountsPerCall is the upstream's limit on To_Account.
const MaxAccountsPerCall = 100

// DefaultAdministrator is the admin account name the IM console creates;
// every component that needs an admin identifier defaults to it.
const DefaultAdministrator = "administrator"
