"""User-facing errors: one line naming the file, the key and the problem."""


class SpecError(Exception):
    """A problem with user input (spec file, option, table file). Printed as one line; exit 2."""

    def __init__(self, where, key, problem):
        self.where, self.key, self.problem = str(where), str(key), str(problem)
        super().__init__(f"{self.where}: {self.key}: {self.problem}")

    def __reduce__(self):                  # picklable across worker processes
        return (SpecError, (self.where, self.key, self.problem))
